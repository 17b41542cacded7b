import path from 'node:path';
import { startProcess, type ManagedProcess } from './processes';
import { REPO_ROOT } from './service-process';

/** The CSI driver's entry point (services/csi). */
export const CSI_MAIN = path.join(REPO_ROOT, 'services', 'csi', 'dist', 'main.js');

/** The CSI user the local mesh's controller runs as (role operator in the roles file). */
export const CSI_CONTROLLER_USER = 'csi-controller';

/** A CSI plugin process of the local mesh: the controller, or one host's node plugin. */
export interface RunningCsiPlugin {
  mode: 'controller' | 'node';
  host: string;
  /** unix:///<socket path>, what CSI clients (and csi-sanity) dial. */
  endpoint: string;
  socketPath: string;
  metricsPort: number;
  process: ManagedProcess;
  lines: string[];
}

/** Starts `sdmesh-csi --mode <mode>` and waits for its ready line. */
export async function startCsiPlugin(
  mode: 'controller' | 'node',
  opts: { host: string; socketPath: string; env: NodeJS.ProcessEnv; args?: string[]; logFile?: string; timeoutMs?: number },
): Promise<RunningCsiPlugin> {
  const lines: string[] = [];
  let onReady: (port: number) => void = () => undefined;
  const ready = new Promise<number>((resolve) => (onReady = resolve));
  const proc = startProcess(
    `csi-${mode}@${opts.host}`,
    process.execPath,
    [CSI_MAIN, '--mode', mode, '--host-name', opts.host, '--csi-endpoint', `unix://${opts.socketPath}`, ...(opts.args ?? [])],
    {
      env: { ...process.env, ...opts.env },
      logFile: opts.logFile,
      onLine: (line) => {
        lines.push(line);
        if (lines.length > 5000) lines.shift();
        if (!line.includes('"ready"')) return;
        try {
          const rec = JSON.parse(line) as { msg?: string; metricsPort?: number };
          if (rec.msg === 'ready' && rec.metricsPort) onReady(rec.metricsPort);
        } catch {
          // not JSON
        }
      },
    },
  );
  let timer: NodeJS.Timeout | undefined;
  const metricsPort = await Promise.race([
    ready,
    proc.exited.then((code) => {
      throw new Error(`csi-${mode}@${opts.host} exited (${code}) before it was ready:\n${lines.slice(-20).join('\n')}`);
    }),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`csi-${mode}@${opts.host} not ready after ${opts.timeoutMs ?? 30000} ms`)), opts.timeoutMs ?? 30000);
    }),
  ]).finally(() => clearTimeout(timer));
  return { mode, host: opts.host, endpoint: `unix://${opts.socketPath}`, socketPath: opts.socketPath, metricsPort, process: proc, lines };
}
