/**
 * @sdmesh/sanlock — typed wrapper over libsanlock (N-API addon, Debian sanlock 3.8.x).
 *
 * ## One daemon per Node process
 * libsanlock reads `SANLOCK_RUN_DIR` from the C environment **once per process**, on its first
 * connection to the daemon (it caches the socket directory in a static). So one Node process talks
 * to exactly one sanlock daemon ("host"). Either start the process with `SANLOCK_RUN_DIR` set, or
 * call {@link setRunDir} before any other function here. (Assigning `process.env.SANLOCK_RUN_DIR`
 * is not enough inside jest, whose sandboxed `process.env` is a copy that does not reach C's
 * environment; `setRunDir` calls setenv(3) itself.)
 *
 * ## Promises and errors
 * Every call that talks to the daemon runs in a libuv worker thread and returns a Promise. A
 * failing call rejects with a {@link SanlockError} whose `code` is the negative sanlock/errno
 * return value (e.g. -17 EEXIST, -243 SANLK_ACQUIRE_IDLIVE, -247 SANLK_ACQUIRE_OWNED_RETRY, -11
 * EAGAIN, -2 ENOENT); see {@link describeSanlockError}. Invalid arguments (names > 48 bytes,
 * paths >= 1024 bytes, bad host ids, > 8 resources ...) throw a {@link SanlockArgumentError}
 * (a TypeError) synchronously, before anything reaches C.
 *
 * Blocking: an acquire against an owner whose host is failing blocks *inside the daemon* (and a
 * libuv pool thread) until that host is dead (~8*io_timeout + watchdog). Pass
 * `ownerNoWait: true` and retry on -247 instead.
 */
import { EventEmitter } from 'node:events';
import * as path from 'node:path';

// ------------------------------------------------------------------ constants (from sanlock*.h)

export const SANLK_NAME_LEN = 48;
export const SANLK_PATH_LEN = 1024;
export const SANLK_HELPER_PATH_LEN = 128;
export const SANLK_HELPER_ARGS_LEN = 128;
export const SANLK_MAX_RESOURCES = 8;
export const SANLK_MAX_HOST_ID = 2000;

export const SANLK_RES_LVER = 0x1;
export const SANLK_RES_SHARED = 0x4;
export const SANLK_RES_PERSISTENT = 0x8;

export const SANLK_ACQUIRE_LVB = 0x1;
export const SANLK_ACQUIRE_ORPHAN = 0x2;
export const SANLK_ACQUIRE_ORPHAN_ONLY = 0x4;
export const SANLK_ACQUIRE_OWNER_NOWAIT = 0x8;
export const SANLK_REL_ALL = 0x1;
export const SANLK_CONVERT_OWNER_NOWAIT = 0x8;
export const SANLK_REQUEST_NEXT_LVER = 0x1;
export const SANLK_REQ_FORCE = 0x1;
export const SANLK_REQ_GRACEFUL = 0x2;
export const SANLK_KILLPATH_PID = 0x1;
export const SANLK_RESTRICT_ALL = 0x1;
export const SANLK_RESTRICT_SIGKILL = 0x2;
export const SANLK_RESTRICT_SIGTERM = 0x4;

export const SANLK_ADD_ASYNC = 0x1;
export const SANLK_REM_ASYNC = 0x1;
export const SANLK_REM_UNUSED = 0x2;
export const SANLK_WRITE_CLEAR = 0x1;
export const SANLK_LSF_ADD = 0x1;
export const SANLK_LSF_REM = 0x2;

export const SANLK_HOST_UNKNOWN = 1;
export const SANLK_HOST_FREE = 2;
export const SANLK_HOST_LIVE = 3;
export const SANLK_HOST_FAIL = 4;
export const SANLK_HOST_DEAD = 5;
export const SANLK_HOST_MASK = 0xf;

/** Well-known return codes (negative). */
export const SanlockCode = {
  EPERM: -1,
  ENOENT: -2,
  ESRCH: -3,
  EINTR: -4,
  EIO: -5,
  EAGAIN: -11,
  ENOMEM: -12,
  EACCES: -13,
  EBUSY: -16,
  EEXIST: -17,
  EINVAL: -22,
  ENOSPC: -28,
  EPIPE: -32,
  ERANGE: -34,
  ENOTCONN: -107,
  ECONNREFUSED: -111,
  ETIMEDOUT: -110,
  EINPROGRESS: -115,
  ECONNRESET: -104,
  SANLK_ERROR: -201,
  SANLK_AIO_TIMEOUT: -202,
  SANLK_WD_ERROR: -203,
  SANLK_DBLOCK_READ: -210,
  SANLK_DBLOCK_WRITE: -211,
  SANLK_DBLOCK_LVER: -212,
  SANLK_DBLOCK_MBAL: -213,
  SANLK_DBLOCK_CHECKSUM: -214,
  SANLK_LEADER_READ: -220,
  SANLK_LEADER_WRITE: -221,
  SANLK_LEADER_DIFF: -222,
  SANLK_LEADER_MAGIC: -223,
  SANLK_LEADER_VERSION: -224,
  SANLK_LEADER_SECTORSIZE: -225,
  SANLK_LEADER_LOCKSPACE: -226,
  SANLK_LEADER_RESOURCE: -227,
  SANLK_LEADER_NUMHOSTS: -228,
  SANLK_LEADER_CHECKSUM: -229,
  SANLK_ADDLS_SIZES: -230,
  SANLK_ADDLS_INVALID_HOSTID: -231,
  SANLK_ACQUIRE_LVER: -240,
  SANLK_ACQUIRE_LOCKSPACE: -241,
  SANLK_ACQUIRE_IDDISK: -242,
  SANLK_ACQUIRE_IDLIVE: -243,
  SANLK_ACQUIRE_OWNED: -244,
  SANLK_ACQUIRE_OTHER: -245,
  SANLK_ACQUIRE_SHRETRY: -246,
  SANLK_ACQUIRE_OWNED_RETRY: -247,
  SANLK_RELEASE_LVER: -250,
  SANLK_RELEASE_OWNER: -251,
  SANLK_RENEW_OWNER: -260,
  SANLK_RENEW_DIFF: -261,
  SANLK_HOSTID_BUSY: -262,
  SANLK_REQUEST_MAGIC: -270,
  SANLK_REQUEST_VERSION: -271,
  SANLK_REQUEST_OLD: -272,
  SANLK_REQUEST_LVER: -273,
} as const;

const DESCRIPTIONS: Record<number, string> = {
  [-1]: 'operation not permitted (EPERM)',
  [-2]: 'not found (ENOENT): lockspace/resource/lease not present',
  [-3]: 'no such registered process (ESRCH): the target pid is not registered with this daemon',
  [-4]: 'interrupted (EINTR)',
  [-5]: 'I/O error (EIO)',
  [-11]: 'try again (EAGAIN): busy, not ready yet, or shared holders prevent the conversion',
  [-12]: 'out of memory (ENOMEM)',
  [-13]: 'permission denied (EACCES)',
  [-16]: 'busy (EBUSY): another call is active on this registered connection, or lockspace in use',
  [-17]: 'already exists (EEXIST): lockspace already joined, or resource already held on this host',
  [-22]: 'invalid argument (EINVAL)',
  [-28]: 'no space (ENOSPC)',
  [-32]: 'broken pipe (EPIPE): the sanlock daemon went away',
  [-34]: 'out of range (ERANGE)',
  [-104]: 'connection reset (ECONNRESET): the sanlock daemon went away',
  [-107]: 'not connected (ENOTCONN): registered connection closed or daemon hung up',
  [-110]: 'timed out (ETIMEDOUT)',
  [-111]: 'connection refused (ECONNREFUSED): no sanlock daemon listening in SANLOCK_RUN_DIR',
  [-115]: 'in progress (EINPROGRESS): lockspace add/remove still in progress',
  [-201]: 'sanlock: generic error',
  [-202]: 'sanlock: disk I/O timed out',
  [-203]: 'sanlock: watchdog error',
  [-210]: 'sanlock: dblock read error',
  [-211]: 'sanlock: dblock write error',
  [-212]: 'sanlock: dblock lver mismatch',
  [-213]: 'sanlock: dblock mbal mismatch',
  [-214]: 'sanlock: dblock checksum error',
  [-220]: 'sanlock: leader read error',
  [-221]: 'sanlock: leader write error',
  [-222]: 'sanlock: leader differs between disks',
  [-223]: 'sanlock: no lease magic (area not formatted)',
  [-224]: 'sanlock: lease version mismatch',
  [-225]: 'sanlock: lease sector size mismatch',
  [-226]: 'sanlock: lease lockspace name does not match',
  [-227]: 'sanlock: lease resource name does not match',
  [-228]: 'sanlock: lease num_hosts mismatch',
  [-229]: 'sanlock: lease checksum error',
  [-230]: 'sanlock: add_lockspace: bad sizes',
  [-231]: 'sanlock: add_lockspace: invalid host id',
  [-240]: 'sanlock: acquire: lver mismatch',
  [-241]: 'sanlock: acquire: lockspace not joined',
  [-242]: 'sanlock: acquire: owner host id disk error',
  [-243]: 'sanlock: acquire: held by another live host (IDLIVE)',
  [-244]: 'sanlock: acquire: owned by another host',
  [-245]: 'sanlock: acquire: other error',
  [-246]: 'sanlock: acquire: shared lease retry (SHRETRY)',
  [-247]: 'sanlock: acquire: owner host not yet dead; retry later (OWNER_NOWAIT)',
  [-250]: 'sanlock: release: lver mismatch',
  [-251]: 'sanlock: release: not the owner',
  [-260]: 'sanlock: renew: not the owner',
  [-261]: 'sanlock: renew: lease differs',
  [-262]: 'sanlock: host id busy (used by another live host)',
  [-270]: 'sanlock: request: bad magic',
  [-271]: 'sanlock: request: bad version',
  [-272]: 'sanlock: request: lver older than current',
  [-273]: 'sanlock: request: lver mismatch',
};

/** Words for a sanlock/errno return code (negative or positive errno accepted). */
export function describeSanlockError(code: number): string {
  const c = code > 0 && code < 200 ? -code : code;
  return DESCRIPTIONS[c] ?? `unknown sanlock/errno code ${code}`;
}

/** Rejection of a daemon call: `code` is the negative sanlock/errno return value. */
export class SanlockError extends Error {
  readonly code: number;
  readonly op: string;
  constructor(op: string, code: number, message?: string) {
    super(message ?? `sanlock ${op} failed: ${describeSanlockError(code)} (${code})`);
    this.name = 'SanlockError';
    this.code = code;
    this.op = op;
  }
}

/** Thrown synchronously for invalid arguments, before anything reaches libsanlock. */
export class SanlockArgumentError extends TypeError {
  readonly code = 'ERR_SANLOCK_ARGUMENT';
  constructor(message: string) {
    super(`sanlock: ${message}`);
    this.name = 'SanlockArgumentError';
  }
}

/** True if `err` is a SanlockError with the given code. */
export function isSanlockError(err: unknown, code?: number): err is SanlockError {
  return err instanceof SanlockError && (code === undefined || err.code === code);
}

// ------------------------------------------------------------------ public types

/** One lease area: a resource name in a lockspace at (path, offset). */
export interface ResourceSpec {
  name: string;
  path: string;
  /** byte offset of the lease in `path` (a multiple of the align size, 1 MiB for files) */
  offset?: number;
  /** expected lver (acquire fails with -240 if the on-disk lver differs) */
  lver?: number;
}

export interface AcquireOptions {
  /** shared (SANLK_RES_SHARED) instead of exclusive */
  shared?: boolean;
  /** SANLK_ACQUIRE_OWNER_NOWAIT: fail with -247 instead of blocking until a failing owner is dead */
  ownerNoWait?: boolean;
  /** SANLK_ACQUIRE_LVB: enable the lease value block */
  lvb?: boolean;
  /** SANLK_RES_PERSISTENT: the lease becomes an orphan when the holder exits */
  persistent?: boolean;
  /** SANLK_ACQUIRE_ORPHAN: take over an orphan of this resource if one exists */
  orphan?: boolean;
  /** optional owner name shown by the daemon (<= 48 bytes) */
  ownerName?: string;
}

export interface HeldResource {
  lockspace: string;
  name: string;
  path: string;
  offset: number;
  /** lver of an exclusive lease (0 for shared: sanlock reports ":SH" instead) */
  lver: number;
  shared: boolean;
  disks: { path: string; offset: number }[];
}

export interface LockspaceSpec {
  name: string;
  hostId: number;
  path: string;
  offset?: number;
}

export interface AddLockspaceOptions extends LockspaceSpec {
  /** io_timeout in seconds for this lockspace (0/undefined: the daemon's default, 10) */
  ioTimeout?: number;
  /** SANLK_ADD_ASYNC: return at once; poll {@link inqLockspace} */
  async?: boolean;
}

export type LockspaceState = 'joined' | 'joining' | 'not-joined';

export interface LockspaceInfo {
  name: string;
  hostId: number;
  path: string;
  offset: number;
  flags: number;
  /** SANLK_LSF_ADD: being added */
  adding: boolean;
  /** SANLK_LSF_REM: being removed */
  removing: boolean;
}

export type HostState = 'free' | 'live' | 'fail' | 'dead' | 'unknown';

export interface HostInfo {
  hostId: number;
  generation: number;
  timestamp: number;
  ioTimeout: number;
  state: HostState;
  flags: number;
}

export interface ResourceInfo {
  lockspace: string;
  name: string;
  lver: number;
  flags: number;
  shared: boolean;
}

export interface ResourceOwner {
  hostId: number;
  generation: number;
  /** set for an exclusive owner (from the leader record), 0 for shared owners */
  timestamp: number;
}

export interface ResourceOwners {
  lver: number;
  /** true if any shared owners exist */
  shared: boolean;
  owners: ResourceOwner[];
}

// ------------------------------------------------------------------ native binding

interface NativeDisk {
  path: string;
  offset: number;
}
interface NativeResource {
  lockspace: string;
  name: string;
  disks: NativeDisk[];
  lver?: number;
  flags?: number;
}
interface NativeResourceOut {
  lockspace: string;
  name: string;
  lver: number;
  flags: number;
  disks: NativeDisk[];
}
interface NativeLockspace {
  name: string;
  hostId?: number;
  path?: string;
  offset?: number;
  flags?: number;
}
interface NativeLockspaceOut {
  name: string;
  hostId: number;
  flags: number;
  path: string;
  offset: number;
  ioTimeout?: number;
}
interface NativeHost {
  hostId: number;
  generation: number;
  timestamp: number;
  ioTimeout: number;
  flags: number;
}
interface NativeHangupWatcher {
  stop(): void;
}
interface NativeBinding {
  setRunDir(dir: string): void;
  register(): number;
  closeFd(fd: number): void;
  getCloexec(fd: number): boolean;
  HangupWatcher: new (fd: number, cb: (reason: string) => void) => NativeHangupWatcher;
  killpath(sock: number, flags: number, path: string, args: string): Promise<void>;
  restrict(sock: number, flags: number): Promise<void>;
  acquire(sock: number, pid: number, flags: number, res: NativeResource[], ownerName?: string): Promise<void>;
  acquireInquire(sock: number, pid: number, flags: number, res: NativeResource[], ownerName?: string): Promise<NativeResourceOut[] | null>;
  release(sock: number, pid: number, flags: number, res: NativeResource[]): Promise<void>;
  convert(sock: number, pid: number, flags: number, res: NativeResource): Promise<void>;
  inquire(sock: number, pid: number): Promise<NativeResourceOut[]>;
  request(flags: number, force: number, res: NativeResource): Promise<void>;
  setLvb(flags: number, res: NativeResource, value: Buffer): Promise<void>;
  getLvb(flags: number, res: NativeResource, len: number): Promise<Buffer>;
  addLockspace(ls: NativeLockspace, flags: number, ioTimeout: number): Promise<void>;
  inqLockspace(ls: NativeLockspace, flags: number): Promise<number>;
  remLockspace(ls: NativeLockspace, flags: number): Promise<void>;
  getLockspaces(): Promise<NativeLockspaceOut[]>;
  getHosts(name: string, hostId: number): Promise<NativeHost[]>;
  writeLockspace(ls: NativeLockspace, maxHosts: number, flags: number, ioTimeout: number): Promise<void>;
  readLockspace(ls: NativeLockspace): Promise<NativeLockspaceOut>;
  writeResource(res: NativeResource, maxHosts: number, numHosts: number, flags: number): Promise<void>;
  readResource(res: NativeResource): Promise<NativeResourceOut>;
  readResourceOwners(res: NativeResource): Promise<{ resource: NativeResourceOut; owners: NativeHost[] }>;
  align(path: string): Promise<number>;
  version(): Promise<{ version: number; proto: number }>;
  strerror(code: number): string;
  peerCredentials(fd: number): PeerCredentials;
}

/** Package directory: works from src/ (ts-jest) and from dist/ (compiled). */
export const PACKAGE_DIR = path.resolve(__dirname, '..');
/** Where `npm run build:native -w @sdmesh/sanlock` puts the addon. */
export const ADDON_PATH = path.join(PACKAGE_DIR, 'build', 'Release', 'sanlock_addon.node');

let nativeBinding: NativeBinding | undefined;

function native(): NativeBinding {
  if (nativeBinding === undefined) {
    try {
      nativeBinding = require(ADDON_PATH) as NativeBinding;
    } catch (err) {
      const e = new Error(
        `@sdmesh/sanlock: cannot load the native addon ${ADDON_PATH} ` + `(build it with: npm run build:native -w @sdmesh/sanlock): ${(err as Error).message}`,
      );
      (e as Error & { cause?: unknown }).cause = err;
      throw e;
    }
  }
  return nativeBinding;
}

/** Convert the addon's plain Error (with numeric code/op) into a SanlockError. */
function wrapError(err: unknown): never {
  if (err instanceof SanlockError) throw err;
  const e = err as { code?: unknown; op?: unknown; message?: unknown };
  if (e && typeof e.code === 'number') {
    const op = typeof e.op === 'string' ? e.op : 'call';
    throw new SanlockError(op, e.code, `sanlock ${op} failed: ${describeSanlockError(e.code)} (${e.code})`);
  }
  throw err;
}

async function call<T>(p: () => Promise<T>): Promise<T> {
  try {
    return await p();
  } catch (err) {
    return wrapError(err);
  }
}

/** How long a command refused -16 (EBUSY) is tried again; the pause between tries doubles up to 100 ms. */
const BUSY_RETRY_MS = 5000;

/**
 * {@link call} for a command about one registered process's leases. sanlock runs one such command
 * at a time per registered process and refuses another meanwhile with -16 (EBUSY). Calls of one
 * process are queued here, but a holder's own calls (on its connection) and the lease-manager's
 * calls for its pid come from two processes and can meet: such a refusal is tried again after a
 * moment (a command takes milliseconds; up to hundreds on a loaded machine) instead of passing for
 * a lease held by another or a release that failed.
 */
async function callWhileBusy<T>(p: () => Promise<T>): Promise<T> {
  const giveUpAt = Date.now() + BUSY_RETRY_MS;
  for (let pause = 1; ; pause = Math.min(pause * 2, 100)) {
    try {
      return await call(p);
    } catch (err) {
      if (!isSanlockError(err, SanlockCode.EBUSY) || Date.now() >= giveUpAt) throw err;
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}

// ------------------------------------------------------------------ validation

function checkName(what: string, v: unknown): string {
  if (typeof v !== 'string' || v.length === 0) throw new SanlockArgumentError(`${what} must be a non-empty string`);
  const n = Buffer.byteLength(v, 'utf8');
  if (n > SANLK_NAME_LEN) throw new SanlockArgumentError(`${what} '${v}' is ${n} bytes; the limit is ${SANLK_NAME_LEN}`);
  if (/[:\s\0]/.test(v)) {
    throw new SanlockArgumentError(`${what} '${v}' must not contain ':', whitespace or NUL (sanlock's string formats)`);
  }
  return v;
}

function checkPath(what: string, v: unknown): string {
  if (typeof v !== 'string' || v.length === 0) throw new SanlockArgumentError(`${what} must be a non-empty string`);
  const n = Buffer.byteLength(v, 'utf8');
  if (n >= SANLK_PATH_LEN) {
    throw new SanlockArgumentError(`${what} is ${n} bytes; the limit is ${SANLK_PATH_LEN - 1} (plus NUL)`);
  }
  if (v.includes('\0')) throw new SanlockArgumentError(`${what} must not contain NUL`);
  return v;
}

function checkUint(what: string, v: unknown, def?: number, max = Number.MAX_SAFE_INTEGER): number {
  if (v === undefined && def !== undefined) return def;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > max) {
    throw new SanlockArgumentError(`${what} must be an integer in 0..${max} (got ${String(v)})`);
  }
  return v;
}

function checkHostId(v: unknown, allowZero = false): number {
  const id = checkUint('hostId', v, undefined, SANLK_MAX_HOST_ID);
  if (id === 0 && !allowZero) throw new SanlockArgumentError(`hostId must be 1..${SANLK_MAX_HOST_ID}`);
  return id;
}

function checkPid(v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0 || v > 0x7fffffff) {
    throw new SanlockArgumentError(`pid must be a positive integer (got ${String(v)})`);
  }
  return v;
}

function toNativeResources(lockspace: string, resources: readonly ResourceSpec[], flags = 0): NativeResource[] {
  checkName('lockspace', lockspace);
  if (!Array.isArray(resources) || resources.length === 0 || resources.length > SANLK_MAX_RESOURCES) {
    throw new SanlockArgumentError(`between 1 and ${SANLK_MAX_RESOURCES} resources per call`);
  }
  return resources.map((r) => toNativeResource(lockspace, r, flags));
}

function toNativeResource(lockspace: string, r: ResourceSpec, flags = 0): NativeResource {
  if (r === null || typeof r !== 'object') throw new SanlockArgumentError('resource must be an object');
  const out: NativeResource = {
    lockspace: checkName('lockspace', lockspace),
    name: checkName('resource name', r.name),
    disks: [{ path: checkPath('resource path', r.path), offset: checkUint('resource offset', r.offset, 0) }],
    flags,
  };
  if (r.lver !== undefined) out.lver = checkUint('lver', r.lver);
  return out;
}

function toHeld(r: NativeResourceOut): HeldResource {
  const d = r.disks[0] ?? { path: '', offset: 0 };
  return {
    lockspace: r.lockspace,
    name: r.name,
    path: d.path,
    offset: d.offset,
    lver: r.lver,
    shared: (r.flags & SANLK_RES_SHARED) !== 0,
    disks: r.disks,
  };
}

function acquireFlags(opts: AcquireOptions): { flags: number; resFlags: number } {
  let flags = 0;
  let resFlags = 0;
  if (opts.ownerNoWait) flags |= SANLK_ACQUIRE_OWNER_NOWAIT;
  if (opts.lvb) flags |= SANLK_ACQUIRE_LVB;
  if (opts.orphan) flags |= SANLK_ACQUIRE_ORPHAN;
  if (opts.shared) resFlags |= SANLK_RES_SHARED;
  if (opts.persistent) resFlags |= SANLK_RES_PERSISTENT;
  if (opts.ownerName !== undefined && Buffer.byteLength(opts.ownerName) > SANLK_NAME_LEN) {
    throw new SanlockArgumentError(`ownerName longer than ${SANLK_NAME_LEN} bytes`);
  }
  return { flags, resFlags };
}

/** Serializes async calls (one registered connection / one target pid at a time). */
class CallQueue {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => undefined);
    return next;
  }
}

// ------------------------------------------------------------------ process-level

/**
 * Point libsanlock at a daemon's run dir (setenv SANLOCK_RUN_DIR). Must be called before the
 * first call to the daemon in this process; later changes throw (libsanlock caches it).
 */
export function setRunDir(dir: string): void {
  checkPath('run dir', dir);
  native().setRunDir(dir);
}

export interface SanlockClientEvents {
  /** the daemon closed the registered connection (daemon died): treat all leases as lost */
  hangup: [reason: string];
}

/**
 * A registered connection (`sanlock_register()`), i.e. this process as a lease holder.
 * Leases acquired on it belong to this process and are released by the daemon when the
 * connection closes (process exit or {@link close}). The fd has FD_CLOEXEC so children
 * (qemu-img ...) never inherit it. Calls on one client are serialized by an internal queue.
 *
 * Emits `'hangup'` (once) when the daemon side of the connection goes away — the daemon died,
 * so every lease of this client must be treated as lost (stop I/O, exit). After a hangup,
 * further calls reject with -107 (ENOTCONN).
 */
export class SanlockClient extends EventEmitter<SanlockClientEvents> {
  readonly fd: number;
  readonly pid = process.pid;
  private readonly queue = new CallQueue();
  private watcher: NativeHangupWatcher | undefined;
  private _closed = false;
  private _hungUp: string | undefined;

  /** @internal use {@link registerProcess} */
  constructor(fd: number) {
    super();
    this.fd = fd;
    this.watcher = new (native().HangupWatcher)(fd, (reason) => {
      this.watcher = undefined;
      this._hungUp = reason;
      this.emit('hangup', reason);
    });
  }

  get closed(): boolean {
    return this._closed;
  }
  /** undefined while connected; the hang-up reason after the daemon went away */
  get hungUp(): string | undefined {
    return this._hungUp;
  }
  /** whether FD_CLOEXEC is set on the registered fd (it always should be) */
  get cloexec(): boolean {
    return !this._closed && native().getCloexec(this.fd);
  }

  private run<T>(op: string, fn: () => Promise<T>): Promise<T> {
    return this.queue.run(async () => {
      if (this._closed) throw new SanlockError(op, SanlockCode.ENOTCONN, `sanlock ${op}: client is closed`);
      if (this._hungUp !== undefined) {
        throw new SanlockError(op, SanlockCode.ENOTCONN, `sanlock ${op}: daemon hung up (${this._hungUp})`);
      }
      return callWhileBusy(fn);
    });
  }

  /**
   * Program sanlock runs instead of SIGTERM when the lockspace fails (`sanlock_killpath`).
   * `path` and `args` must each be < 128 bytes. With `appendPid` (SANLK_KILLPATH_PID) sanlock
   * appends the holder's pid to the args.
   */
  killpath(path: string, args: string | string[] = '', opts: { appendPid?: boolean } = {}): Promise<void> {
    const a = Array.isArray(args) ? args.join(' ') : args;
    if (typeof path !== 'string' || path.length === 0) throw new SanlockArgumentError('killpath path required');
    if (Buffer.byteLength(path) >= SANLK_HELPER_PATH_LEN) {
      throw new SanlockArgumentError(`killpath path must be < ${SANLK_HELPER_PATH_LEN} bytes`);
    }
    if (Buffer.byteLength(a) >= SANLK_HELPER_ARGS_LEN) {
      throw new SanlockArgumentError(`killpath args must be < ${SANLK_HELPER_ARGS_LEN} bytes`);
    }
    const flags = opts.appendPid ? SANLK_KILLPATH_PID : 0;
    return this.run('killpath', () => native().killpath(this.fd, flags, path, a));
  }

  /** `sanlock_restrict` (SANLK_RESTRICT_SIGKILL / SIGTERM / ALL). */
  restrict(flags: number): Promise<void> {
    checkUint('restrict flags', flags);
    return this.run('restrict', () => native().restrict(this.fd, flags));
  }

  /** Acquire leases for this process (up to 8 per call, all-or-nothing). */
  acquire(lockspace: string, resources: readonly ResourceSpec[], opts: AcquireOptions = {}): Promise<void> {
    const { flags, resFlags } = acquireFlags(opts);
    const res = toNativeResources(lockspace, resources, resFlags);
    return this.run('acquire', () => native().acquire(this.fd, -1, flags, res, opts.ownerName));
  }

  /** Release leases held by this process; `'all'` releases everything (SANLK_REL_ALL). */
  release(lockspace: string, resources: readonly ResourceSpec[] | 'all'): Promise<void> {
    const res = resources === 'all' ? [] : toNativeResources(lockspace, resources);
    const flags = resources === 'all' ? SANLK_REL_ALL : 0;
    return this.run('release', () => native().release(this.fd, -1, flags, res));
  }

  /** Release up to 8 leases of this process, of any lockspaces, in one call. */
  releaseMany(leases: readonly LeaseSpec[]): Promise<void> {
    if (!Array.isArray(leases) || leases.length === 0 || leases.length > SANLK_MAX_RESOURCES) {
      throw new SanlockArgumentError(`between 1 and ${SANLK_MAX_RESOURCES} resources per call`);
    }
    const res = leases.map((l) => toNativeResource(l.lockspace, l));
    return this.run('release', () => native().release(this.fd, -1, 0, res));
  }

  /** Convert a held lease between shared and exclusive (SH->EX fails -11 while others hold SH). */
  convert(lockspace: string, resource: ResourceSpec, opts: { shared: boolean; ownerNoWait?: boolean }): Promise<void> {
    const res = toNativeResource(lockspace, resource, opts.shared ? SANLK_RES_SHARED : 0);
    const flags = opts.ownerNoWait ? SANLK_CONVERT_OWNER_NOWAIT : 0;
    return this.run('convert', () => native().convert(this.fd, -1, flags, res));
  }

  /** Leases held by this process. */
  inquire(): Promise<HeldResource[]> {
    return this.run('inquire', async () => (await native().inquire(this.fd, -1)).map(toHeld));
  }

  /**
   * Close the registered connection (after queued calls). The daemon releases every lease still
   * held by this client.
   */
  close(): Promise<void> {
    return this.queue.run(async () => {
      if (this._closed) return;
      this._closed = true;
      this.watcher?.stop();
      this.watcher = undefined;
      native().closeFd(this.fd);
    });
  }
}

/**
 * Register this process with the daemon (`sanlock_register`) and return the client. The daemon
 * processes the registration asynchronously: if another process is going to acquire for this
 * pid, first do one round trip on the client (e.g. `await client.inquire()`) so the daemon has
 * seen the registration (otherwise the other side may get -3 ESRCH).
 */
export function registerProcess(): SanlockClient {
  let fd: number;
  try {
    fd = native().register();
  } catch (err) {
    return wrapError(err);
  }
  return new SanlockClient(fd);
}

// ------------------------------------------------------------------ on behalf of another pid

const pidQueues = new Map<number, { q: CallQueue; n: number }>();

function runForPid<T>(pid: number, fn: () => Promise<T>): Promise<T> {
  let e = pidQueues.get(pid);
  if (!e) {
    e = { q: new CallQueue(), n: 0 };
    pidQueues.set(pid, e);
  }
  const entry = e;
  entry.n++;
  return entry.q
    .run(() => callWhileBusy(fn))
    .finally(() => {
      if (--entry.n === 0) pidQueues.delete(pid);
    });
}

/**
 * Acquire leases on behalf of another process registered with the same daemon
 * (`sanlock_acquire(-1, pid, ...)`, libvirt's model). The leases belong to that process: they are
 * released when it exits, and it is the one sanlock kills when the lockspace fails. Rejects with
 * -3 (ESRCH) if `pid` is not registered. Calls for the same pid are serialized in this process.
 */
export function acquireForPid(pid: number, lockspace: string, resources: readonly ResourceSpec[], opts: AcquireOptions = {}): Promise<void> {
  checkPid(pid);
  const { flags, resFlags } = acquireFlags(opts);
  const res = toNativeResources(lockspace, resources, resFlags);
  return runForPid(pid, () => native().acquire(-1, pid, flags, res, opts.ownerName));
}

/**
 * {@link acquireForPid}, then the leases `pid` holds afterwards ({@link inquireForPid}: their
 * lvers, the fencing tokens), in one call on one worker thread: no trip back through the event
 * loop between the two. Resolves to undefined if the acquire succeeded but the inquire failed.
 */
export function acquireForPidAndInquire(
  pid: number,
  lockspace: string,
  resources: readonly ResourceSpec[],
  opts: AcquireOptions = {},
): Promise<HeldResource[] | undefined> {
  checkPid(pid);
  const { flags, resFlags } = acquireFlags(opts);
  const res = toNativeResources(lockspace, resources, resFlags);
  return runForPid(pid, async () => (await native().acquireInquire(-1, pid, flags, res, opts.ownerName))?.map(toHeld));
}

/** A lease of a several-lease acquire: its own lockspace and its own mode. */
export interface LeaseSpec extends ResourceSpec {
  lockspace: string;
  /** shared (SANLK_RES_SHARED, a per-resource flag) instead of exclusive */
  shared?: boolean;
}

/**
 * {@link acquireForPidAndInquire} of up to 8 leases (SANLK_MAX_RESOURCES) in one
 * `sanlock_acquire`, each in its own lockspace and mode: all or none (sanlock releases the ones
 * it took when one fails). `opts.shared` does not apply (each lease says its mode).
 */
export function acquireManyForPidAndInquire(
  pid: number,
  leases: readonly LeaseSpec[],
  opts: Omit<AcquireOptions, 'shared'> = {},
): Promise<HeldResource[] | undefined> {
  checkPid(pid);
  const { flags, resFlags } = acquireFlags({ ...opts, shared: false });
  if (!Array.isArray(leases) || leases.length === 0 || leases.length > SANLK_MAX_RESOURCES) {
    throw new SanlockArgumentError(`between 1 and ${SANLK_MAX_RESOURCES} resources per call`);
  }
  const res = leases.map((l) => toNativeResource(l.lockspace, l, resFlags | (l.shared ? SANLK_RES_SHARED : 0)));
  return runForPid(pid, async () => (await native().acquireInquire(-1, pid, flags, res, opts.ownerName))?.map(toHeld));
}

/** Release leases held by another registered process (`'all'`: SANLK_REL_ALL). */
export function releaseForPid(pid: number, lockspace: string, resources: readonly ResourceSpec[] | 'all'): Promise<void> {
  checkPid(pid);
  const res = resources === 'all' ? [] : toNativeResources(lockspace, resources);
  const flags = resources === 'all' ? SANLK_REL_ALL : 0;
  return runForPid(pid, () => native().release(-1, pid, flags, res));
}

/** Leases held by another registered process (-3 ESRCH if it is not registered). */
export function inquireForPid(pid: number): Promise<HeldResource[]> {
  checkPid(pid);
  return runForPid(pid, async () => (await native().inquire(-1, pid)).map(toHeld));
}

/** Convert a lease held by another registered process. */
export function convertForPid(pid: number, lockspace: string, resource: ResourceSpec, opts: { shared: boolean; ownerNoWait?: boolean }): Promise<void> {
  checkPid(pid);
  const res = toNativeResource(lockspace, resource, opts.shared ? SANLK_RES_SHARED : 0);
  const flags = opts.ownerNoWait ? SANLK_CONVERT_OWNER_NOWAIT : 0;
  return runForPid(pid, () => native().convert(-1, pid, flags, res));
}

// ------------------------------------------------------------------ lockspaces

function toNativeLockspace(ls: LockspaceSpec): NativeLockspace {
  if (ls === null || typeof ls !== 'object') throw new SanlockArgumentError('lockspace spec must be an object');
  return {
    name: checkName('lockspace name', ls.name),
    hostId: checkHostId(ls.hostId),
    path: checkPath('lockspace path', ls.path),
    offset: checkUint('lockspace offset', ls.offset, 0),
  };
}

/**
 * Join a lockspace with a host id (`sanlock_add_lockspace_timeout`). Takes ~2*io_timeout+1 s
 * with a free host id (3 s at io_timeout 1, 21 s at the default 10). With `async` it returns at
 * once; poll {@link inqLockspace}. Rejects -17 if already joined, -115 if a join is in progress,
 * -262 if the host id is used by another live host.
 */
export function addLockspace(opts: AddLockspaceOptions): Promise<void> {
  const ls = toNativeLockspace(opts);
  const io = checkUint('ioTimeout', opts.ioTimeout, 0, 0xffffffff);
  const flags = opts.async ? SANLK_ADD_ASYNC : 0;
  return call(() => native().addLockspace(ls, flags, io));
}

/** 'joined' (0), 'joining' (-EINPROGRESS) or 'not-joined' (-ENOENT); other codes reject. */
export async function inqLockspace(ls: LockspaceSpec): Promise<LockspaceState> {
  const n = toNativeLockspace(ls);
  const rv = await call(() => native().inqLockspace(n, 0));
  if (rv === 0) return 'joined';
  if (rv === SanlockCode.EINPROGRESS) return 'joining';
  if (rv === SanlockCode.ENOENT) return 'not-joined';
  throw new SanlockError('inq_lockspace', rv);
}

/**
 * Leave a lockspace (`sanlock_rem_lockspace`). Without `unused` the daemon kills every process
 * holding leases in it; with `unused` it rejects -16 (EBUSY) instead while leases are held.
 */
export function remLockspace(ls: LockspaceSpec, opts: { async?: boolean; unused?: boolean } = {}): Promise<void> {
  const n = toNativeLockspace(ls);
  const flags = (opts.async ? SANLK_REM_ASYNC : 0) | (opts.unused ? SANLK_REM_UNUSED : 0);
  return call(() => native().remLockspace(n, flags));
}

/** Lockspaces of this daemon (`sanlock_get_lockspaces`), with add/remove in progress flags. */
export async function getLockspaces(): Promise<LockspaceInfo[]> {
  const list = await call(() => native().getLockspaces());
  return list.map((l) => ({
    name: l.name,
    hostId: l.hostId,
    path: l.path,
    offset: l.offset,
    flags: l.flags,
    adding: (l.flags & SANLK_LSF_ADD) !== 0,
    removing: (l.flags & SANLK_LSF_REM) !== 0,
  }));
}

function hostState(flags: number): HostState {
  switch (flags & SANLK_HOST_MASK) {
    case SANLK_HOST_FREE:
      return 'free';
    case SANLK_HOST_LIVE:
      return 'live';
    case SANLK_HOST_FAIL:
      return 'fail';
    case SANLK_HOST_DEAD:
      return 'dead';
    default:
      return 'unknown';
  }
}

/**
 * Hosts seen in a joined lockspace (`sanlock_get_hosts`); hostId 0 = every host seen alive.
 * Right after a join the daemon has no data yet and answers -11 (EAGAIN): by default this retries
 * for up to `notReadyWaitMs` (5000) before rejecting. Rejects -2 if the lockspace is not joined.
 */
export async function getHosts(lockspace: string, hostId = 0, opts: { notReadyWaitMs?: number } = {}): Promise<HostInfo[]> {
  checkName('lockspace', lockspace);
  checkHostId(hostId, true);
  const deadline = Date.now() + (opts.notReadyWaitMs ?? 5000);
  for (;;) {
    try {
      const hosts = await call(() => native().getHosts(lockspace, hostId));
      return hosts.map((h) => ({ ...h, state: hostState(h.flags) }));
    } catch (err) {
      if (!isSanlockError(err, SanlockCode.EAGAIN) || Date.now() >= deadline) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

// ------------------------------------------------------------------ formatting and reading

/**
 * Format a lockspace (delta lease) area through the daemon (`sanlock_write_lockspace`).
 * Files get 512-byte sectors and 1 MiB alignment (max 2000 hosts); the file must exist and
 * hold at least one align unit from `offset`.
 */
export function writeLockspace(opts: { name: string; path: string; offset?: number; maxHosts?: number; ioTimeout?: number }): Promise<void> {
  const ls: NativeLockspace = {
    name: checkName('lockspace name', opts.name),
    path: checkPath('lockspace path', opts.path),
    offset: checkUint('offset', opts.offset, 0),
  };
  const maxHosts = checkUint('maxHosts', opts.maxHosts, 0, SANLK_MAX_HOST_ID);
  const io = checkUint('ioTimeout', opts.ioTimeout, 0, 0xffffffff);
  return call(() => native().writeLockspace(ls, maxHosts, 0, io));
}

/** Read the lockspace leader at (path, offset) (`sanlock_read_lockspace`, host id 1's record). */
export async function readLockspace(
  lockspacePath: string,
  offset = 0,
): Promise<{ name: string; path: string; offset: number; ioTimeout: number; flags: number }> {
  const ls: NativeLockspace = { name: '', path: checkPath('path', lockspacePath), offset: checkUint('offset', offset) };
  const r = await call(() => native().readLockspace(ls));
  return { name: r.name, path: r.path, offset: r.offset, ioTimeout: r.ioTimeout ?? 0, flags: r.flags };
}

/**
 * Format a resource (paxos) lease area through the daemon (`sanlock_write_resource`).
 * `numHosts`: the host ids 1..numHosts the area serves (0: as many as the area holds, 2000 at
 * 512-byte sectors). Each acquire reads the ballot blocks of numHosts hosts, so fewer is faster;
 * a host id above it is refused. The daemon (3.8) takes num_hosts from the call's first count (the
 * one named max_hosts in libsanlock) and derives max_hosts from the alignment, so both get it.
 * `clear` (SANLK_WRITE_CLEAR) makes later reads/acquires fail: use it to retire a lease.
 */
export function writeResource(
  res: { lockspace: string; name: string; path: string; offset?: number },
  opts: { numHosts?: number; clear?: boolean } = {},
): Promise<void> {
  const n = toNativeResource(res.lockspace, res);
  const numHosts = checkUint('numHosts', opts.numHosts, 0, SANLK_MAX_HOST_ID);
  return call(() => native().writeResource(n, numHosts, numHosts, opts.clear ? SANLK_WRITE_CLEAR : 0));
}

/** Read the resource leader at (path, offset) (`sanlock_read_resource`). */
export async function readResource(leasePath: string, offset = 0): Promise<ResourceInfo> {
  const n: NativeResource = {
    lockspace: '',
    name: '',
    disks: [{ path: checkPath('path', leasePath), offset: checkUint('offset', offset) }],
  };
  const r = await call(() => native().readResource(n));
  return { lockspace: r.lockspace, name: r.name, lver: r.lver, flags: r.flags, shared: (r.flags & SANLK_RES_SHARED) !== 0 };
}

/**
 * Owners of a resource lease as written on disk (`sanlock_read_resource_owners`). The lockspace
 * and resource names must match the leader (else -226 / -227). An empty `owners` means free.
 */
export async function readResourceOwners(lockspace: string, name: string, leasePath: string, offset = 0): Promise<ResourceOwners> {
  const n = toNativeResource(lockspace, { name, path: leasePath, offset });
  const r = await call(() => native().readResourceOwners(n));
  return {
    lver: r.resource.lver,
    shared: (r.resource.flags & SANLK_RES_SHARED) !== 0,
    owners: r.owners.map((h) => ({ hostId: h.hostId, generation: h.generation, timestamp: h.timestamp })),
  };
}

/**
 * Ask the owner host of a resource to give it up (`sanlock_request`): force 1 = SANLK_REQ_FORCE
 * (SIGKILL the holder), 2 = SANLK_REQ_GRACEFUL (killpath or SIGTERM), 0 = just record the
 * request. Without `lver` the daemon requests the current lver + 1 (SANLK_REQUEST_NEXT_LVER).
 */
export function request(lockspace: string, resource: ResourceSpec, opts: { force: 0 | 1 | 2; lver?: number }): Promise<void> {
  const n = toNativeResource(lockspace, { ...resource, lver: opts.lver });
  const flags = opts.lver === undefined ? SANLK_REQUEST_NEXT_LVER : 0;
  if (![0, 1, 2].includes(opts.force)) throw new SanlockArgumentError('force must be 0, 1 or 2');
  return call(() => native().request(flags, opts.force, n));
}

/** Write the lease value block of a lease held with `lvb: true` (stored at release). */
export function setLvb(lockspace: string, resource: ResourceSpec, value: Buffer): Promise<void> {
  const n = toNativeResource(lockspace, resource);
  if (!Buffer.isBuffer(value) || value.length === 0 || value.length > 4096) {
    throw new SanlockArgumentError('lvb value must be a Buffer of 1..4096 bytes');
  }
  return call(() => native().setLvb(0, n, value));
}

/** Read the lease value block of a lease held with `lvb: true`. */
export function getLvb(lockspace: string, resource: ResourceSpec, length = 512): Promise<Buffer> {
  const n = toNativeResource(lockspace, resource);
  checkUint('lvb length', length, undefined, 4096);
  return call(() => native().getLvb(0, n, length));
}

/** Default alignment sanlock uses for `path` (`sanlock_align`): 1 MiB for files / 512 B disks. */
export function alignment(leasePath: string): Promise<number> {
  checkPath('path', leasePath);
  return call(() => native().align(leasePath));
}

/** Daemon version (`sanlock_version`): `version` packs major<<24 | minor<<16 | patch<<8. */
export async function version(): Promise<{ version: string; raw: number; proto: number }> {
  const v = await call(() => native().version());
  const raw = v.version >>> 0;
  return { raw, proto: v.proto, version: `${raw >>> 24}.${(raw >>> 16) & 0xff}.${(raw >>> 8) & 0xff}` };
}

/** Who is at the other end of a connected unix socket, as the kernel says (SO_PEERCRED). */
export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/** SO_PEERCRED of a connected unix socket's file descriptor. */
export function peerCredentials(fd: number): PeerCredentials {
  return native().peerCredentials(fd);
}

// Confined file access (openat2 beneath a directory): see confined-fs.ts.
export { openBeneath, confinedSteps, type ConfinedSteps, type RawStat } from './confined-fs';
