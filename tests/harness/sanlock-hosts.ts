/**
 * Test harness: N real sanlock daemons on this machine, each simulating one host.
 *
 * Each daemon runs in the foreground (`sanlock daemon -D`) as a child of the test process, in
 * unprivileged mode (`SANLOCK_PRIVILEGED=0`, no watchdog `-w 0`, no mlock `-l 0`) with its own
 * `SANLOCK_RUN_DIR` and its own host name (`-e`). Sharing one lockspace file between the daemons,
 * with distinct host ids, behaves like several hosts on shared storage.
 *
 * Daemons are started through `setpriv --pdeathsig KILL` when available, so they die with the test
 * process even if it is SIGKILLed; `stopAll()` and a process 'exit' hook also kill them.
 *
 * libsanlock talks to one daemon per process (SANLOCK_RUN_DIR is read once), so per-host client
 * work runs in child processes: see {@link startHostAgent} (packages/sanlock/test-fixtures/host-agent.js).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { processRunning } from '@sdmesh/common';

export interface SanlockHost {
  /** 1..n: use it as this host's id in lockspaces */
  readonly hostId: number;
  /** daemon host name (`-e`), stable across restart() */
  readonly name: string;
  readonly runDir: string;
  /** process.env plus SANLOCK_RUN_DIR and SANLOCK_PRIVILEGED=0: give it to this host's clients */
  readonly env: NodeJS.ProcessEnv;
  /** the daemon's pid (changes on restart) */
  readonly pid: number;
  /** daemon stderr (-D log) */
  readonly logFile: string;
  readonly alive: boolean;
  /** send a signal to the daemon and wait until it (and its helper) are gone */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** kill (if alive) and start again with the same name and run dir */
  restart(): Promise<void>;
}

export interface SanlockHosts {
  readonly baseDir: string;
  readonly hosts: SanlockHost[];
  /** host by id (1-based) */
  host(hostId: number): SanlockHost;
  /** kill every daemon (SIGKILL) and wait for them; removes baseDir unless keepBaseDir */
  stopAll(): Promise<void>;
}

export interface StartOptions {
  /** parent dir for run dirs and lease files; default a fresh /var/tmp/sdmesh-test-XXXXXX (O_DIRECT-capable, not tmpfs) */
  baseDir?: string;
  /** keep baseDir on stopAll (default: keep only if the caller supplied it) */
  keepBaseDir?: boolean;
  /** prefix for daemon host names (default sdmesh-<pid>-<random>) */
  namePrefix?: string;
  /** readiness timeout per daemon, ms (default 10000) */
  startTimeoutMs?: number;
}

const allDaemons = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const c of allDaemons) {
      try {
        if (c.pid) process.kill(c.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
  });
}

let setprivChecked: boolean | undefined;
function haveSetpriv(): boolean {
  if (setprivChecked === undefined) {
    const r = spawnSync('setpriv', ['--help'], { encoding: 'utf8' });
    setprivChecked = r.status === 0 && /pdeathsig/.test(r.stdout ?? '');
  }
  return setprivChecked;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** pids of the direct children of `pid` (sanlock forks a "sanlock-helper"). */
function childPids(pid: number): number[] {
  try {
    const s = fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim();
    return s ? s.split(/\s+/).map(Number) : [];
  } catch {
    return [];
  }
}

function processExists(pid: number): boolean {
  return fs.existsSync(`/proc/${pid}`);
}

function canConnect(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(sock);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

class Host implements SanlockHost {
  readonly env: NodeJS.ProcessEnv;
  readonly logFile: string;
  private child: ChildProcess | undefined;
  private helpers: number[] = [];
  private exited: Promise<void> = Promise.resolve();

  constructor(
    readonly hostId: number,
    readonly name: string,
    readonly runDir: string,
    private readonly startTimeoutMs: number,
  ) {
    this.env = { ...process.env, SANLOCK_RUN_DIR: runDir, SANLOCK_PRIVILEGED: '0' };
    this.logFile = path.join(runDir, 'sanlock-daemon.log');
  }

  get pid(): number {
    return this.child?.pid ?? -1;
  }

  get alive(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  async start(): Promise<void> {
    fs.mkdirSync(this.runDir, { recursive: true });
    const sock = path.join(this.runDir, 'sanlock.sock');
    fs.rmSync(sock, { force: true });
    const log = fs.openSync(this.logFile, 'a');
    const args = ['daemon', '-D', '-w', '0', '-l', '0', '-U', 'root', '-G', 'root', '-e', this.name];
    const [cmd, argv] = haveSetpriv() ? ['setpriv', ['--pdeathsig', 'KILL', 'sanlock', ...args]] : ['sanlock', args];
    const child = spawn(cmd, argv, { env: this.env, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    this.child = child;
    allDaemons.add(child);
    this.exited = new Promise((resolve) => {
      child.once('exit', () => {
        allDaemons.delete(child);
        resolve();
      });
    });
    const deadline = Date.now() + this.startTimeoutMs;
    for (;;) {
      if (!this.alive) {
        const tail = fs.readFileSync(this.logFile, 'utf8').split('\n').slice(-15).join('\n');
        throw new Error(`sanlock daemon for host ${this.hostId} exited during start; log tail:\n${tail}`);
      }
      if (fs.existsSync(sock) && (await canConnect(sock))) break;
      if (Date.now() > deadline) {
        await this.kill('SIGKILL');
        throw new Error(`sanlock daemon for host ${this.hostId} did not open ${sock} in ${this.startTimeoutMs} ms`);
      }
      await sleep(20);
    }
    this.helpers = childPids(child.pid ?? -1);
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child) return;
    const helpers = [...new Set([...this.helpers, ...childPids(child.pid ?? -1)])];
    if (this.alive) {
      try {
        child.kill(signal);
      } catch {
        /* already gone */
      }
    }
    // a daemon that ignores the signal (e.g. SIGTERM with lockspaces) is left running on purpose
    if (signal === 'SIGKILL' || signal === 'SIGTERM' || signal === 'SIGINT') {
      const t = setTimeout(
        () => {
          if (this.alive) child.kill('SIGKILL');
        },
        signal === 'SIGKILL' ? 0 : 5000,
      );
      await this.exited;
      clearTimeout(t);
      // the helper exits when its parent dies; make sure, then wait for it to be reaped
      for (const h of helpers) {
        try {
          process.kill(h, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      // wait until they are reaped (by init, their new parent) so `pgrep sanlock` is clean after tests
      const deadline = Date.now() + 5000;
      while (helpers.some(processRunning) && Date.now() < deadline) await sleep(10);
      while (helpers.some(processExists) && Date.now() < deadline) await sleep(20);
    }
  }

  async restart(): Promise<void> {
    await this.kill('SIGKILL');
    await this.start();
  }
}

/** Start `n` sanlock daemons (hosts 1..n). Always call stopAll() (e.g. in afterAll). */
export async function startSanlockHosts(n: number, opts: StartOptions = {}): Promise<SanlockHosts> {
  if (!Number.isInteger(n) || n < 1 || n > 50) throw new Error('startSanlockHosts: n must be 1..50');
  installExitHook();
  const ownDir = opts.baseDir === undefined;
  const baseDir = opts.baseDir ?? fs.mkdtempSync(path.join('/var/tmp', 'sdmesh-test-'));
  fs.mkdirSync(baseDir, { recursive: true });
  const prefix = opts.namePrefix ?? `sdmesh-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const hosts: Host[] = [];
  for (let i = 1; i <= n; i++) {
    hosts.push(new Host(i, `${prefix}-h${i}`, path.join(baseDir, `host${i}`), opts.startTimeoutMs ?? 10000));
  }
  const keep = opts.keepBaseDir ?? !ownDir;
  const stopAll = async (): Promise<void> => {
    await Promise.all(hosts.map((h) => h.kill('SIGKILL')));
    if (!keep) fs.rmSync(baseDir, { recursive: true, force: true });
  };
  try {
    await Promise.all(hosts.map((h) => h.start()));
  } catch (err) {
    await stopAll();
    throw err;
  }
  return {
    baseDir,
    hosts,
    host(hostId: number): SanlockHost {
      const h = hosts[hostId - 1];
      if (!h) throw new Error(`no host ${hostId}`);
      return h;
    },
    stopAll,
  };
}

export const ALIGN = 1024 * 1024;

export interface LockspaceFiles {
  lockspace: string;
  /** delta lease area (one 1 MiB align unit, host ids 1..2000) */
  idsPath: string;
  /** resource lease area: one 1 MiB lease per resource, in `resources` order */
  leasesPath: string;
  /** resource name -> byte offset in leasesPath */
  offsets: Record<string, number>;
  /** convenience: {name, path, offset} for a formatted resource */
  resource(name: string): { name: string; path: string; offset: number };
}

/**
 * Create and format `<dir>/<lockspace>.ids` and `<dir>/<lockspace>.leases` without a daemon
 * (`sanlock direct init -o <ioTimeout>`, default io_timeout 1 so that joins take ~3 s rather than
 * 21 s — pass the same ioTimeout to addLockspace). Files are sized first (one 1 MiB align unit per area) plus a 4 KiB guard
 * area; `dir` must be on a filesystem that supports O_DIRECT (not tmpfs).
 */
export function formatLockspaceFiles(dir: string, lockspace: string, opts: { resources?: string[]; ioTimeout?: number } = {}): LockspaceFiles {
  const resources = opts.resources ?? [];
  const io = String(opts.ioTimeout ?? 1);
  fs.mkdirSync(dir, { recursive: true });
  const idsPath = path.join(dir, `${lockspace}.ids`);
  const leasesPath = path.join(dir, `${lockspace}.leases`);
  const guard = 4096;
  fs.writeFileSync(idsPath, '');
  fs.truncateSync(idsPath, ALIGN + guard);
  fs.writeFileSync(leasesPath, '');
  fs.truncateSync(leasesPath, Math.max(1, resources.length) * ALIGN + guard);
  const run = (args: string[]): void => {
    const r = spawnSync('sanlock', args, { encoding: 'utf8' });
    if (r.status !== 0) {
      throw new Error(`sanlock ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
    }
  };
  // -o: io_timeout recorded in the delta leases; a join waits 2*io+1 s based on it (21 s at 10)
  run(['direct', 'init', '-o', io, '-s', `${lockspace}:0:${idsPath}:0`]);
  const offsets: Record<string, number> = {};
  resources.forEach((name, i) => {
    offsets[name] = i * ALIGN;
    run(['direct', 'init', '-o', io, '-r', `${lockspace}:${name}:${leasesPath}:${i * ALIGN}`]);
  });
  return {
    lockspace,
    idsPath,
    leasesPath,
    offsets,
    resource(name: string) {
      const offset = offsets[name];
      if (offset === undefined) throw new Error(`resource ${name} was not formatted`);
      return { name, path: leasesPath, offset };
    },
  };
}

// ------------------------------------------------------------------ per-host child agents

export const HOST_AGENT_PATH = path.resolve(__dirname, '..', '..', 'packages', 'sanlock', 'test-fixtures', 'host-agent.js');

export class AgentError extends Error {
  constructor(
    readonly op: string,
    readonly code: number,
    message: string,
  ) {
    super(message);
    this.name = 'AgentError';
  }
}

interface AgentReply {
  id?: number;
  ok?: boolean;
  result?: unknown;
  error?: { code: number; message: string };
  event?: string;
  reason?: string;
  pid?: number;
}

/**
 * A child process talking to one host's daemon through the raw addon (see host-agent.js). Each agent
 * is a separate lease-holding process: SIGKILL it to simulate a crashed holder.
 */
export class HostAgent {
  readonly hangups: string[] = [];
  /** Date.now() when the first hang-up event arrived */
  hangupAt: number | undefined;
  private nextId = 1;
  private pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; op: string }>();
  private hangupWaiters: (() => void)[] = [];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private stderr = '';

  constructor(
    readonly host: SanlockHost,
    private readonly child: ChildProcess,
  ) {
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        allAgents.delete(child);
        for (const p of this.pending.values()) p.reject(new Error(`agent exited (${code ?? signal}): ${this.stderr}`));
        this.pending.clear();
        resolve({ code, signal });
      });
    });
    child.stderr?.on('data', (d: Buffer) => {
      this.stderr += d.toString();
    });
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  /** @internal */
  onLine(line: string): void {
    let msg: AgentReply;
    try {
      msg = JSON.parse(line) as AgentReply;
    } catch {
      return;
    }
    if (msg.event === 'hangup') {
      this.hangups.push(msg.reason ?? '');
      this.hangupAt ??= Date.now();
      for (const w of this.hangupWaiters.splice(0)) w();
      return;
    }
    if (msg.id === undefined) return;
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new AgentError(p.op, msg.error?.code ?? 0, msg.error?.message ?? 'agent error'));
  }

  call<T = unknown>(op: string, args: Record<string, unknown> = {}): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, op });
      this.child.stdin?.write(JSON.stringify({ id, op, args }) + '\n');
    });
  }

  /** resolves once the agent reported a hang-up of its registered fd */
  waitHangup(timeoutMs = 5000): Promise<string> {
    if (this.hangups.length > 0) return Promise.resolve(this.hangups[0] as string);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no hangup reported')), timeoutMs);
      this.hangupWaiters.push(() => {
        clearTimeout(t);
        resolve(this.hangups[0] as string);
      });
    });
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<unknown> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return this.exited;
  }
}

const allAgents = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of allAgents) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
});

/** Spawn a host agent bound to `host`'s daemon; resolves when it is ready. */
export async function startHostAgent(host: SanlockHost): Promise<HostAgent> {
  const child = spawn(process.execPath, [HOST_AGENT_PATH], { env: host.env, stdio: ['pipe', 'pipe', 'pipe'] });
  allAgents.add(child);
  const agent = new HostAgent(host, child);
  const rl = readline.createInterface({ input: child.stdout as NodeJS.ReadableStream });
  await new Promise<void>((resolve, reject) => {
    const onExit = (): void => reject(new Error('host agent exited before ready'));
    child.once('exit', onExit);
    rl.once('line', (first) => {
      child.off('exit', onExit);
      if (first.includes('"ready"')) resolve();
      else reject(new Error(`host agent: unexpected first line ${first}`));
      rl.on('line', (l) => agent.onLine(l));
    });
  });
  return agent;
}

/** Default temp dir helper for lease files (O_DIRECT-capable). */
export function tempLeaseDir(prefix = 'sdmesh-leases-'): string {
  return fs.mkdtempSync(path.join(fs.existsSync('/var/tmp') ? '/var/tmp' : os.tmpdir(), prefix));
}
