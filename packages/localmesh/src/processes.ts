import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';

/** Every child started here, so that an exiting parent never leaves one behind. */
const children = new Set<ChildProcess>();

function killAllChildren(): void {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) {
      try {
        c.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}
process.on('exit', killAllChildren);

export interface ManagedProcess {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  /** Resolves with the exit code (or signal name) when the process ends. */
  readonly exited: Promise<number | string>;
  /** Sends a signal and waits for the exit (SIGKILL after timeoutMs). */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | string>;
  running(): boolean;
}

/**
 * Spawns a long-running child with stdout/stderr appended to a log file (and optionally
 * handed to onLine), tracked so it is killed when this process exits.
 */
export function startProcess(
  name: string,
  command: string,
  args: string[],
  opts: SpawnOptions & { logFile?: string; onLine?: (line: string, stream: 'stdout' | 'stderr') => void; stdin?: 'pipe' | 'ignore' } = {},
): ManagedProcess {
  const child = spawn(command, args, { ...opts, stdio: [opts.stdin ?? 'ignore', 'pipe', 'pipe'] });
  children.add(child);
  const log = opts.logFile ? fs.createWriteStream(opts.logFile, { flags: 'a' }) : undefined;
  for (const stream of ['stdout', 'stderr'] as const) {
    let buf = '';
    child[stream]?.on('data', (d: Buffer) => {
      log?.write(d);
      if (!opts.onLine) return;
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        opts.onLine(buf.slice(0, nl), stream);
        buf = buf.slice(nl + 1);
      }
    });
  }
  const exited = new Promise<number | string>((resolve) => {
    child.once('exit', (code, signal) => {
      children.delete(child);
      resolve(code ?? signal ?? -1);
    });
    child.once('error', () => resolve(-1));
  });
  exited.finally(() => log?.end()).catch(() => undefined);
  const running = () => child.exitCode === null && child.signalCode === null;
  return {
    name,
    child,
    pid: child.pid ?? -1,
    exited,
    running,
    async stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 15000) {
      if (!running()) return exited;
      child.kill(signal);
      const timer = setTimeout(() => running() && child.kill('SIGKILL'), timeoutMs);
      const r = await exited;
      clearTimeout(timer);
      return r;
    },
  };
}

/** Ports freePort has handed out in this process: never the same one twice. */
const handedOut = new Set<number>();
/** Where freePort picks: from here up to the kernel's ephemeral range. */
const PICK_FROM = 20000;

/** The lowest port the kernel gives outgoing connections and port-0 binds (32768 by default). */
function ephemeralLow(): number {
  try {
    const low = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]);
    return Number.isInteger(low) ? low : 32768;
  } catch {
    return 32768;
  }
}

/** Test runners in parallel (jest workers) each pick from their own slice, so two of them never race for one port. */
const PICK_SLICES = 4;

/** [from, below): where this process picks ports. */
function pickRange(): [number, number] {
  const below = ephemeralLow();
  const worker = Number(process.env.JEST_WORKER_ID);
  if (!Number.isInteger(worker) || worker < 1) return [PICK_FROM, below];
  const width = Math.floor((below - PICK_FROM) / PICK_SLICES);
  const from = PICK_FROM + ((worker - 1) % PICK_SLICES) * width;
  return [from, from + width];
}

/** Binds host:port and closes it again: whether it was free a moment ago. */
function canBind(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, host, () => srv.close(() => resolve(true)));
  });
}

/**
 * A TCP port that was free a moment ago, for a service to bind later. Picked below the kernel's
 * ephemeral range: a port from that range can be taken by any outgoing connection (a NATS or
 * gRPC client of another service) between the pick and the service's bind (EADDRINUSE, seen in
 * CI). Falls back to a kernel-chosen port where the ephemeral range leaves no room below it.
 */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  const [from, below] = pickRange();
  for (let attempt = 0; below - from >= 1000 && attempt < 100; attempt++) {
    const port = from + Math.floor(Math.random() * (below - from));
    if (handedOut.has(port)) continue;
    handedOut.add(port);
    if (await canBind(port, host)) return port;
  }
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const port = (srv.address() as net.AddressInfo).port;
      handedOut.add(port);
      srv.close(() => resolve(port));
    });
  });
}

/** Waits until something accepts TCP connections on host:port. */
export async function waitForPort(port: number, host = '127.0.0.1', timeoutMs = 15000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, host);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`nothing listens on ${host}:${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function waitFor<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, timeoutMs = 15000, everyMs = 100): Promise<T> {
  const end = Date.now() + timeoutMs;
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v as T;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? `: ${String(lastErr)}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
