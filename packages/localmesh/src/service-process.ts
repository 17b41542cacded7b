import path from 'node:path';
import { startProcess, type ManagedProcess } from './processes';

export const REPO_ROOT = path.resolve(__dirname, '../../..');

export const SERVICE_NAMES = ['lease-manager', 'metadata-tx', 'data-mover', 'gc', 'scheduler'] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

/** Path of a service's compiled entry point. */
export const serviceMain = (name: ServiceName) => path.join(REPO_ROOT, 'services', name, 'dist', 'main.js');

export interface RunningService {
  name: ServiceName;
  host: string;
  grpcAddress: string;
  grpcPort: number;
  metricsPort: number;
  process: ManagedProcess;
  /** Log lines seen so far (JSON strings). */
  lines: string[];
}

/**
 * Starts one service as its own process (`node services/<name>/dist/main.js`) and waits
 * for its "ready" log line, which carries the ports it bound.
 */
export async function startService(
  name: ServiceName,
  opts: { host: string; env?: NodeJS.ProcessEnv; args?: string[]; logFile?: string; timeoutMs?: number; onLine?: (line: string) => void },
): Promise<RunningService> {
  const lines: string[] = [];
  let onReady: (ports: { grpcPort: number; metricsPort: number }) => void = () => undefined;
  const ready = new Promise<{ grpcPort: number; metricsPort: number }>((resolve) => (onReady = resolve));
  // --host-name on the command line (not only in the environment) so that `ps` shows which
  // host a process belongs to (pgrep -f 'host-name host2' finds one host's services).
  const proc = startProcess(`${name}@${opts.host}`, process.execPath, [serviceMain(name), '--host-name', opts.host, ...(opts.args ?? [])], {
    env: { ...process.env, SDMESH_HOST_NAME: opts.host, ...opts.env },
    logFile: opts.logFile,
    onLine: (line) => {
      lines.push(line);
      if (lines.length > 5000) lines.shift();
      opts.onLine?.(line);
      if (!line.includes('"ready"')) return;
      try {
        const rec = JSON.parse(line) as { msg?: string; grpcPort?: number; metricsPort?: number };
        if (rec.msg === 'ready' && rec.grpcPort && rec.metricsPort) onReady({ grpcPort: rec.grpcPort, metricsPort: rec.metricsPort });
      } catch {
        // not JSON
      }
    },
  });
  const timeoutMs = opts.timeoutMs ?? 30000;
  let timer: NodeJS.Timeout | undefined;
  const ports = await Promise.race([
    ready,
    proc.exited.then((code) => {
      throw new Error(`${name}@${opts.host} exited (${code}) before it was ready:\n${lines.slice(-20).join('\n')}`);
    }),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        // Given up on: killed, so that it does not come up later holding its ports (a restart
        // on the same ports then failed EADDRINUSE for good: chaos seed 24 at load 60).
        void proc.stop('SIGKILL', 5000).catch(() => undefined);
        reject(new Error(`${name}@${opts.host} not ready after ${timeoutMs} ms`));
      }, timeoutMs);
    }),
  ]).finally(() => clearTimeout(timer));
  const bindHost = opts.env?.SDMESH_GRPC_HOST ?? '127.0.0.1';
  return { name, host: opts.host, grpcAddress: `${bindHost}:${ports.grpcPort}`, ...ports, process: proc, lines };
}
