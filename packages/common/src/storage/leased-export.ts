import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { LEASE_MODE } from '../enums';
import { GrpcStatus, internal, SdmeshError } from '../errors';
import type { ServiceClient } from '../grpc';
import type { LeaseMode } from '../lease-holder';
import { untilLeaseManagerAnswers } from '../lease-manager-restart';
import type { Logger } from '../logger';
import { processRunning } from '../process';
import { hasReason, Reason } from '../reasons';
import type * as pb from '../proto';
import { FIRST_CHILD_FD, imageNodeSpec, type ImageFormatName } from './qemu-img';
import { QmpClient, qmpFailure } from './qmp';

/**
 * A qemu-storage-daemon that exports an image chain (through FUSE or NBD) while holding the
 * volumes' sanlock leases as its own holder pid, the libvirt model of docs/lease-binding.md:
 *
 * 1. `sanlock client command -c qemu-storage-daemon …` registers with the host's sanlock daemon and
 *    execs the storage daemon, which keeps the pid and the registered connection. The daemon starts
 *    with its QMP monitor only: no image is open yet.
 * 2. This process (the daemon's parent: the lease-manager acts only for a caller's own children)
 *    asks the host's lease-manager to acquire each lease for the daemon's pid, then runs the
 *    caller's checks under the leases (a volume's generation).
 * 3. Only then the chain is opened (blockdev-add; the image files are the daemon's inherited fds,
 *    named /dev/fd/N, every layer O_DIRECT: no write waits in this host's page cache after the
 *    lease is gone, no stale page of another host's writes is read) and exported.
 *
 * The leases die with the daemon: sanlock frees them when its registered connection closes. When
 * the host cannot renew the lockspace, sanlock SIGTERMs the daemon (no kill path is registered for
 * an exec'd program; qemu-storage-daemon exits on SIGTERM, SIGKILL follows if not). When the sanlock
 * daemon itself dies nobody fences the holders (tests run without a watchdog): the spawning process,
 * a registered LeaseHolder, must SIGKILL its exports when its own registration hangs up.
 */

export interface ExportedLayer {
  file: FileHandle | number;
  format: ImageFormatName;
}

export type ExportTarget =
  /** A regular file (created if missing) on which the image is mounted: a loop device can sit on it. */
  | { type: 'fuse'; mountpoint: string }
  /** An NBD server on a unix socket, one export of this name. */
  | { type: 'nbd'; socketPath: string; name: string };

export interface ExportLease {
  location: pb.LeaseLocation;
  mode: LeaseMode;
}

export interface LeasedExportOptions {
  /** Names the daemon's QMP socket and log file in runDir ([A-Za-z0-9._-]). */
  id: string;
  runDir: string;
  /** The chain, top layer first; the top is written when `writable`, the backing layers never. */
  layers: ExportedLayer[];
  writable: boolean;
  target: ExportTarget;
  /** Taken in this order, for the daemon's pid, before any image is opened (callers keep a global order). */
  leases: ExportLease[];
  /** This host's lease-manager (unix socket); the caller is the daemon's parent. */
  leaseManager: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
  operationId: string;
  /** Runs once the daemon holds every lease, before the images are opened (e.g. a generation check); a throw stops the daemon. */
  underLeases?: () => Promise<void>;
  /** The environment of the host's sanlock (SANLOCK_RUN_DIR). */
  env?: NodeJS.ProcessEnv;
  log: Logger;
  /** How long the daemon may take to open its monitor. */
  startTimeoutMs?: number;
}

/** What a restarted spawner needs to find a running export again. */
export interface ExportHandle {
  pid: number;
  /** /proc/<pid>/stat start time: tells the daemon from a later process that got its pid. */
  startTime: string;
  qmpSocket: string;
  target: ExportTarget;
}

const TOP_NODE = 'export-top';
const EXPORT_ID = 'export0';

const SANLOCK = process.env.SDMESH_SANLOCK ?? 'sanlock';

/** qemu-storage-daemon's absolute path (sanlock execs it by path). */
export function storageDaemonPath(): string {
  const configured = process.env.SDMESH_QEMU_STORAGE_DAEMON;
  if (configured) return configured;
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    const p = path.join(dir || '.', 'qemu-storage-daemon');
    if (path.isAbsolute(p) && fs.existsSync(p)) return p;
  }
  throw internal('qemu-storage-daemon is not installed (Debian package qemu-system-common)');
}

/** The start time field of /proc/<pid>/stat, or undefined when the process is gone. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** Every file node of a block node tree gets aio=native (valid: every layer is O_DIRECT). */
function withNativeAio(node: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...node };
  if (out.driver === 'file') out.aio = 'native';
  for (const key of ['file', 'backing']) {
    const child = out[key];
    if (child && typeof child === 'object') out[key] = withNativeAio(child as Record<string, unknown>);
  }
  return out;
}

export class LeasedExport {
  private exitSeen = false;

  private constructor(
    readonly handle: ExportHandle,
    private qmp: QmpClient | undefined,
    private readonly child: ChildProcess | undefined,
    private readonly log: Logger,
  ) {
    child?.once('exit', () => (this.exitSeen = true));
  }

  get pid(): number {
    return this.handle.pid;
  }

  /** Starts the daemon, takes the leases for it, runs the checks, opens and exports the chain. */
  static async start(opts: LeasedExportOptions): Promise<LeasedExport> {
    if (!/^[A-Za-z0-9._-]{1,100}$/.test(opts.id)) throw internal(`bad export id "${opts.id}"`);
    if (opts.layers.length === 0) throw internal('an export needs at least one layer');
    fs.mkdirSync(opts.runDir, { recursive: true, mode: 0o700 });
    const qmpSocket = path.join(opts.runDir, `${opts.id}.qmp`);
    fs.rmSync(qmpSocket, { force: true });
    const logFd = fs.openSync(path.join(opts.runDir, `${opts.id}.log`), 'a', 0o600);
    const fds = opts.layers.map((l) => (typeof l.file === 'number' ? l.file : l.file.fd));
    let child: ChildProcess;
    try {
      // Detached (own process group, no pipes): the export outlives a restart of its spawner; the
      // log is a file so a write to stderr never meets a closed pipe.
      child = spawn(
        SANLOCK,
        [
          'client',
          'command',
          '-c',
          storageDaemonPath(),
          '--chardev',
          // A comma in the path is doubled: qemu's option syntax would split it there.
          `socket,id=qmp0,path=${qmpSocket.replaceAll(',', ',,')},server=on,wait=off`,
          '--monitor',
          'chardev=qmp0',
        ],
        { cwd: '/', detached: true, stdio: ['ignore', logFd, logFd, ...fds], env: { ...process.env, ...opts.env } },
      );
    } finally {
      fs.closeSync(logFd);
    }
    child.unref();
    const spawnError = new Promise<never>((_, reject) => child.once('error', (err) => reject(internal(`cannot start the storage daemon: ${err.message}`))));
    spawnError.catch(() => undefined);
    const pid = child.pid;
    if (!pid) return spawnError;
    let qmp: QmpClient | undefined;
    const fail = async (err: unknown): Promise<never> => {
      qmp?.close();
      await killAndWait(pid, child);
      fs.rmSync(qmpSocket, { force: true });
      throw SdmeshError.from(err);
    };
    try {
      qmp = await Promise.race([connectWhenListening(qmpSocket, child, opts.startTimeoutMs ?? 30_000), spawnError]);
    } catch (err) {
      const log = fs
        .readFileSync(path.join(opts.runDir, `${opts.id}.log`), 'utf8')
        .trim()
        .split('\n')
        .slice(-3)
        .join(' ');
      return fail(internal(`the storage daemon did not start: ${SdmeshError.from(err).message}${log ? ` (${log})` : ''}`));
    }
    const handle: ExportHandle = { pid, startTime: processStartTime(pid) ?? '', qmpSocket, target: opts.target };
    const exp = new LeasedExport(handle, qmp, child, opts.log);
    try {
      for (const lease of opts.leases) await acquireForDaemon(opts, lease, pid);
      await opts.underLeases?.();
      const layers = opts.layers.map((l, i) => ({ fd: FIRST_CHILD_FD + i, format: l.format, direct: true }));
      const node = withNativeAio({ ...imageNodeSpec(layers), 'node-name': TOP_NODE, 'read-only': !opts.writable });
      await qmp.execute('blockdev-add', node).catch((err: unknown) => Promise.reject(qmpFailure(err, 'opening the image in the storage daemon')));
      await exp.addExport(opts.target, opts.writable);
    } catch (err) {
      return fail(err);
    }
    opts.log.info({ pid, id: opts.id, target: opts.target, leases: opts.leases.map((l) => `${l.location.resource}:${l.mode}`) }, 'leased export started');
    return exp;
  }

  private async addExport(target: ExportTarget, writable: boolean): Promise<void> {
    const qmp = this.qmp!;
    if (target.type === 'fuse') {
      // FUSE mounts over a regular file; the daemon never creates it.
      fs.closeSync(fs.openSync(target.mountpoint, fs.constants.O_WRONLY | fs.constants.O_CREAT, 0o600));
      await qmp
        .execute('block-export-add', { type: 'fuse', id: EXPORT_ID, 'node-name': TOP_NODE, mountpoint: target.mountpoint, writable, growable: false })
        .catch((err: unknown) => Promise.reject(qmpFailure(err, `exporting the image on ${target.mountpoint}`)));
      await serializeFuseRequests(target.mountpoint);
    } else {
      await qmp
        .execute('nbd-server-start', { addr: { type: 'unix', data: { path: target.socketPath } } })
        .catch((err: unknown) => Promise.reject(qmpFailure(err, `starting the NBD server on ${target.socketPath}`)));
      await qmp
        .execute('block-export-add', { type: 'nbd', id: EXPORT_ID, 'node-name': TOP_NODE, name: target.name, writable })
        .catch((err: unknown) => Promise.reject(qmpFailure(err, `exporting the image as NBD export ${target.name}`)));
    }
  }

  /**
   * Finds a running export again (after the spawner restarted). Undefined when its daemon is gone
   * (or the pid now names another process).
   */
  static async adopt(handle: ExportHandle, log: Logger): Promise<LeasedExport | undefined> {
    if (!processRunning(handle.pid) || processStartTime(handle.pid) !== handle.startTime) return undefined;
    const qmp = await QmpClient.connect(handle.qmpSocket, 5000).catch(() => undefined);
    return new LeasedExport(handle, qmp, undefined, log);
  }

  /** Whether the daemon still runs (sanlock kills it when the lease is lost). */
  running(): boolean {
    return !this.exitSeen && processRunning(this.handle.pid) && processStartTime(this.handle.pid) === this.handle.startTime;
  }

  /** Grows the exported image (QMP block_resize on the top node). */
  async resize(bytes: number): Promise<void> {
    if (!this.qmp) throw internal(`the storage daemon ${this.handle.pid} has no monitor connection`);
    await this.qmp
      .execute('block_resize', { 'node-name': TOP_NODE, size: bytes })
      .catch((err: unknown) => Promise.reject(qmpFailure(err, 'resizing the image')));
  }

  /** The exported image's size in bytes. */
  async size(): Promise<number> {
    if (!this.qmp) throw internal(`the storage daemon ${this.handle.pid} has no monitor connection`);
    const nodes = await this.qmp.execute<Array<{ 'node-name': string; image: { 'virtual-size': number } }>>('query-named-block-nodes', { flat: true });
    const top = nodes.find((n) => n['node-name'] === TOP_NODE);
    if (!top) throw internal('the storage daemon has no exported node');
    return top.image['virtual-size'];
  }

  /**
   * Stops the daemon (its leases are freed by sanlock when it exits) and removes its FUSE mount if
   * a killed daemon left it. Whatever sits on the export (a loop device) must be gone first.
   */
  async stop(graceMs = 10_000): Promise<void> {
    this.qmp?.close();
    if (this.running()) {
      process.kill(this.handle.pid, 'SIGTERM');
      if (!(await waitGone(this.handle.pid, this.handle.startTime, graceMs, this.child))) {
        this.log.warn({ pid: this.handle.pid }, 'storage daemon ignored SIGTERM: SIGKILL');
        await killAndWait(this.handle.pid, this.child);
      }
    }
    if (this.handle.target.type === 'fuse') await unmountStale(this.handle.target.mountpoint);
    fs.rmSync(this.handle.qmpSocket, { force: true });
  }

  /** SIGKILL now (fencing: the host lost sanlock); does not wait. */
  kill(): void {
    if (this.running()) process.kill(this.handle.pid, 'SIGKILL');
  }
}

/**
 * One lease for the storage daemon's pid, across a restart of the lease-manager: a try that ended
 * UNAVAILABLE may have been granted, its answer lost, and sanlock refuses the same pid the same
 * lease twice: before the next try the lease-manager releases it for the daemon if sanlock says
 * the daemon has it (it asks sanlock when its table misses the grant). Any other failure kills
 * the daemon (start's `fail`), and its leases with it.
 */
async function acquireForDaemon(opts: LeasedExportOptions, lease: ExportLease, pid: number): Promise<void> {
  let answerLost = false;
  await untilLeaseManagerAnswers(
    async (each) => {
      if (answerLost) {
        await opts.leaseManager.releaseLease({ lease: lease.location, holderPid: pid }, each).catch((err: unknown) => {
          if (!hasReason(err, Reason.LEASE_NOT_HELD)) throw err;
        });
        answerLost = false;
      }
      try {
        await opts.leaseManager.acquireLease(
          { lease: lease.location, mode: LEASE_MODE.toPb(lease.mode), holderPid: pid, operationId: opts.operationId, wait: false },
          each,
        );
      } catch (err) {
        answerLost = SdmeshError.from(err).code === GrpcStatus.UNAVAILABLE;
        throw err;
      }
    },
    { timeoutMs: 30_000 },
    {
      onRetry: (err, attempt) =>
        opts.log.warn({ err: String(err), attempt, resource: lease.location.resource }, 'the lease-manager did not answer; trying again'),
    },
  );
}

async function connectWhenListening(socket: string, child: ChildProcess, timeoutMs: number): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw internal(`it exited (${child.exitCode ?? child.signalCode})`);
    if (fs.existsSync(socket)) {
      const c = await QmpClient.connect(socket, 5000).catch(() => undefined);
      if (c) return c;
    }
    if (Date.now() > deadline) throw internal(`no QMP monitor after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function waitGone(pid: number, startTime: string | undefined, ms: number, child?: ChildProcess): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    const gone = child ? child.exitCode !== null || child.signalCode !== null : !processRunning(pid) || processStartTime(pid) !== startTime;
    if (gone) return true;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function killAndWait(pid: number, child?: ChildProcess): Promise<void> {
  const startTime = processStartTime(pid);
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  await waitGone(pid, startTime, 30_000, child);
}

const FUSE_CONNECTIONS = '/sys/fs/fuse/connections';

/**
 * One FUSE request in flight at a time on an export. qemu-storage-daemon 7.2 (Debian 12) corrupts
 * data when the kernel sends it several requests at once: O_DIRECT writes of 1 MiB and more (a
 * loop device's bios, each split into concurrent FUSE requests) landed scrambled in the image,
 * while 512 KiB ones, or any size with one request at a time, were exact (measured with cmp; the
 * export's request buffer is reused while a write is still in flight). Async and direct requests
 * are "background" requests in FUSE, so max_background = 1 on this mount's connection (fusectl,
 * named by the mount's device number) serializes them. Without fusectl the export is refused
 * rather than risk the data.
 */
async function serializeFuseRequests(mountpoint: string): Promise<void> {
  if (!isMountPoint(FUSE_CONNECTIONS)) await runUtil('mount', ['-t', 'fusectl', 'fusectl', FUSE_CONNECTIONS]);
  const connection = path.join(FUSE_CONNECTIONS, String(fs.statSync(mountpoint).dev));
  try {
    fs.writeFileSync(path.join(connection, 'max_background'), '1');
  } catch (err) {
    throw internal(`cannot limit the FUSE export on ${mountpoint} to one request at a time (${connection}): ${(err as Error).message}`);
  }
}

/** Whether a path is a mount point now (from /proc/self/mountinfo; octal escapes decoded). */
export function isMountPoint(p: string): boolean {
  const target = path.resolve(p);
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[4]?.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))) === target);
}

/** Unmounts a FUSE mount whose daemon is gone ("transport endpoint is not connected"). */
async function unmountStale(mountpoint: string): Promise<void> {
  if (isMountPoint(mountpoint)) await runUtil('umount', [mountpoint]);
}

function runUtil(file: string, args: string[]): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const c = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
    c.on('error', (e) => reject(internal(`${file} ${args.join(' ')}: ${e.message}`)));
    c.on('close', (code) => (code === 0 ? resolve() : reject(internal(`${file} ${args.join(' ')} failed: ${err.trim()}`))));
  });
}
