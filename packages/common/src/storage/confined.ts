import { close, constants as fsc, fchmod, fchown, fstat, fsync, ftruncate, read, Stats, write, type Dirent } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { confinedSteps, openBeneath, type RawStat } from '@sdmesh/sanlock';
import { GrpcStatus, invalidArgument, SdmeshError } from '../errors';
import { fail, Reason } from '../reasons';

/**
 * Confined file access: the one way sdmesh touches anything under a storage domain.
 *
 * Shared storage is written by more parties than sdmesh (every host that mounts it, storage
 * admins, guests through their raw disks), and sdmesh acts on it as root. So every path under
 * a domain is opened relative to the domain root with openat2(2) `RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV` (the root itself may contain no symlink either): no
 * symlink in any component is followed, `..` cannot leave the root, and no other mounted file
 * system is entered. What was opened is checked by type (regular file, directory) and volume
 * files with more than one hard link are refused. Operations on one name (unlink, rename,
 * mkdir, lstat, link) go through the already-opened parent directory
 * (`/proc/self/fd/<dirfd>/<name>`): the parent cannot be swapped under them, and none of these
 * calls follows a symlink in its last component.
 *
 * Where the built addon has them, the steps a create repeats (lstat, mkdir, a new file written
 * whole, fsync of a directory, rename) run as one native thread-pool job each (confinedSteps:
 * the same openat2 rules, the calls on what it opened) instead of a round trip per system call.
 */

/** Linux O_PATH (not in Node's fs.constants): an fd that names a file without opening it. */
const O_PATH = 0o10000000;

/** Modes of what sdmesh creates (exact: umask does not apply, fchmod sets them). */
export const VOLUME_FILE_MODE = 0o660;
export const RECORD_FILE_MODE = 0o640;
export const DIRECTORY_MODE = 0o770;

/** Who may open domain files: root plus this group (the hypervisor's kvm/qemu). */
let storageGroupId: number | undefined;

/** Sets the group of every file and directory created from now on (undefined = the process's). */
export function setStorageGroup(gid: number | undefined): void {
  storageGroupId = gid;
}

/** Resolves a group name or number to a gid (reads /etc/group). */
export async function resolveGroup(nameOrId: string): Promise<number> {
  if (/^\d+$/.test(nameOrId)) return Number(nameOrId);
  const text = await fs.readFile('/etc/group', 'utf8');
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === nameOrId && gid && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new Error(`group ${JSON.stringify(nameOrId)} does not exist on this host`);
}

export type EntryType = 'file' | 'directory' | 'symlink' | 'fifo' | 'socket' | 'block-device' | 'char-device' | 'unknown';

function typeOfStats(st: Stats): EntryType {
  if (st.isFile()) return 'file';
  if (st.isDirectory()) return 'directory';
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFIFO()) return 'fifo';
  if (st.isSocket()) return 'socket';
  if (st.isBlockDevice()) return 'block-device';
  if (st.isCharacterDevice()) return 'char-device';
  return 'unknown';
}

function typeOfDirent(d: Dirent): EntryType | undefined {
  if (d.isFile()) return 'file';
  if (d.isDirectory()) return 'directory';
  if (d.isSymbolicLink()) return 'symlink';
  if (d.isFIFO()) return 'fifo';
  if (d.isSocket()) return 'socket';
  if (d.isBlockDevice()) return 'block-device';
  if (d.isCharacterDevice()) return 'char-device';
  return undefined; // DT_UNKNOWN (some NFS servers): lstat it
}

const article = (t: EntryType) =>
  t === 'directory' ? 'a directory' : t === 'file' ? 'a regular file' : t === 'unknown' ? 'of an unknown type' : `a ${t.replace('-', ' ')}`;

/** FAILED_PRECONDITION UNEXPECTED_FILE_TYPE: a name sdmesh uses holds something else. */
export function unexpectedType(what: string, found: EntryType, expected: EntryType): SdmeshError {
  const reason = found === 'symlink' ? Reason.SYMLINK_REFUSED : Reason.UNEXPECTED_FILE_TYPE;
  return new SdmeshError(GrpcStatus.FAILED_PRECONDITION, `${what} is ${article(found)}, expected ${article(expected)}: refused`, reason);
}

/** Maps an openat2 / fs error of a confined call to an SdmeshError naming what was refused. */
export function confinedError(err: unknown, what: string, notFoundReason: Reason = Reason.NOT_FOUND): SdmeshError {
  if (err instanceof SdmeshError) return err;
  const e = err as NodeJS.ErrnoException & { step?: string };
  const detail = e?.message ?? String(err);
  switch (e?.code) {
    case 'ELOOP':
      return fail(Reason.SYMLINK_REFUSED, `${what} is or passes through a symbolic link: refused`);
    case 'EXDEV':
      return fail(Reason.OUTSIDE_DOMAIN, `${what} leaves the storage domain or its file system: refused`);
    case 'ENOENT':
      return fail(notFoundReason, `${what} does not exist`);
    case 'ENOTDIR':
    case 'EISDIR':
      return fail(Reason.UNEXPECTED_FILE_TYPE, `${what}: unexpected file type (${e.code})`);
    case 'EEXIST':
    case 'ENOTEMPTY':
      return fail(Reason.ALREADY_EXISTS, `${what} already exists`);
    case 'ENOSPC':
    case 'EDQUOT':
      return fail(Reason.NO_SPACE, `${what}: no space left on the storage`);
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return fail(Reason.STORAGE_PERMISSION_DENIED, `${what}: ${detail}`);
    case 'EIO':
    case 'ESTALE':
    case 'ETIMEDOUT':
    case 'ENOTCONN':
      return fail(Reason.STORAGE_IO_ERROR, `${what}: storage I/O error: ${detail}`);
    default:
      return SdmeshError.from(err);
  }
}

export interface ListedEntry {
  name: string;
  type: EntryType;
}

export interface DirListing {
  /** Entries of an expected type, sorted by name. */
  entries: ListedEntry[];
  /** Entries skipped because of their type (symlinks, FIFOs, devices ...), with the reason. */
  skipped: Array<ListedEntry & { reason: string }>;
}

/** Kinds of file sdmesh opens; volume data and records refuse more than one hard link. */
export type FileKind = 'volume' | 'record' | 'lease-area' | 'file';

export interface AtomicWriteOptions {
  /** Suffix of the temporary file beside the target, e.g. `.tx-<txid>`: unique per writer. */
  tempSuffix: string;
  /** Called after the temp file is durable and before it becomes visible (a fault point). */
  beforeCommit?: () => void | Promise<void>;
  /** Refuse to replace an existing target (commit with link(2), which fails on EEXIST). */
  noReplace?: boolean;
}

const procFd = (fd: number, name?: string) => (name === undefined ? `/proc/self/fd/${fd}` : `/proc/self/fd/${fd}/${name}`);

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve) => close(fd, () => resolve()));
}

function fstatFd(fd: number): Promise<Stats> {
  return new Promise((resolve, reject) => fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

const done = (resolve: () => void, reject: (err: unknown) => void) => (err: NodeJS.ErrnoException | null) => (err ? reject(err) : resolve());

/**
 * Plain operations on a descriptor that a confined call opened (createFileDescriptor): fewer
 * round trips to the thread pool than a FileHandle reopened through /proc (no second open, no
 * handle bookkeeping), for the files every create writes.
 */
export const descriptor = {
  /** Writes all of data at position. */
  async write(fd: number, data: Buffer, position = 0): Promise<void> {
    for (let at = 0; at < data.length;) {
      const n = await new Promise<number>((resolve, reject) =>
        write(fd, data, at, data.length - at, position + at, (err, w) => (err ? reject(err) : resolve(w))),
      );
      at += n;
    }
  },
  read: (fd: number, buf: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }> =>
    new Promise((resolve, reject) => read(fd, buf, offset, length, position, (err, bytesRead) => (err ? reject(err) : resolve({ bytesRead })))),
  truncate: (fd: number, size: number): Promise<void> => new Promise((resolve, reject) => ftruncate(fd, size, done(resolve, reject))),
  sync: (fd: number): Promise<void> => new Promise((resolve, reject) => fsync(fd, done(resolve, reject))),
  /** fsync, then close (closed even when the fsync fails; rejects with its error). */
  async syncAndClose(fd: number): Promise<void> {
    const steps = confinedSteps();
    if (steps) return steps.syncClose(fd);
    try {
      await descriptor.sync(fd);
    } finally {
      await closeFd(fd);
    }
  },
  stat: fstatFd,
  /** Closes; never fails (a close error of a file already synced or only read changes nothing). */
  close: closeFd,
};

/** A Stats from the fields a confined step read (lstatBeneath): the same methods and fields as fs.lstat's. */
function statsOf(raw: RawStat): Stats {
  return Object.assign(Object.create(Stats.prototype) as Stats, raw, { birthtimeMs: 0 });
}

/** Sets the exact mode (umask does not apply) and sdmesh's group on a just-created file or directory. */
async function applyOwnership(fd: number, mode: number): Promise<void> {
  const gid = storageGroupId;
  if (gid !== undefined) await new Promise<void>((resolve, reject) => fchown(fd, -1, gid, done(resolve, reject)));
  await new Promise<void>((resolve, reject) => fchmod(fd, mode, done(resolve, reject)));
}

/**
 * Reopens an opened file for writing with O_DIRECT, through its own descriptor (the same inode:
 * no name is resolved again), so a writer given this descriptor bypasses the host's page cache.
 * A file system that refuses O_DIRECT (EINVAL) is FAILED_PRECONDITION DIRECT_IO_UNSUPPORTED: data
 * is never written through the page cache instead (docs/data-mover.md, "No write outlives its
 * lease"). Reads through the result need aligned buffers: keep the original handle for those.
 */
export async function reopenDirect(handle: fs.FileHandle, what: string): Promise<fs.FileHandle> {
  let direct: fs.FileHandle;
  try {
    direct = await fs.open(procFd(handle.fd), fsc.O_RDWR | fsc.O_DIRECT);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') throw directIoRefused(what);
    throw confinedError(err, what);
  }
  const [a, b] = await Promise.all([handle.stat(), direct.stat()]);
  if (a.ino !== b.ino || a.dev !== b.dev) {
    await direct.close();
    throw fail(Reason.FILE_CHANGED, `${what} changed while it was reopened`);
  }
  return direct;
}

/** FAILED_PRECONDITION DIRECT_IO_UNSUPPORTED for a file whose file system refuses O_DIRECT. */
export function directIoRefused(what: string): SdmeshError {
  return fail(
    Reason.DIRECT_IO_UNSUPPORTED,
    `${what}: its file system refuses O_DIRECT, and volume data is only written bypassing this host's page cache ` +
      "(a write left there could reach the storage after the writer's lease is freed): put storage domains on a file system that supports O_DIRECT",
  );
}

/**
 * A storage domain (or any directory sdmesh confines itself to, like an import directory).
 * Methods take absolute paths (as DomainLayout builds them) and refuse any that is not
 * strictly under the root; each call opens what it needs beneath the root and closes it.
 */
export class ConfinedRoot {
  readonly root: string;

  constructor(root: string) {
    if (!path.isAbsolute(root)) throw invalidArgument(`confined root ${JSON.stringify(root)} is not absolute`, Reason.INVALID_PATH);
    this.root = path.resolve(root);
  }

  /** The path relative to the root ('.' for the root itself); INVALID_PATH if outside it. */
  relative(target: string): string {
    const rel = path.relative(this.root, path.resolve(this.root, target));
    if (rel === '') return '.';
    if (rel.startsWith('..') || path.isAbsolute(rel)) {
      throw invalidArgument(`path ${JSON.stringify(target)} is outside ${this.root}`, Reason.PATH_OUTSIDE_DOMAIN);
    }
    return rel;
  }

  private describe(target: string): string {
    const rel = this.relative(target);
    return rel === '.' ? this.root : `${rel} in ${this.root}`;
  }

  /** openat2 beneath the root; errors name the path and say why. */
  async openFd(target: string, flags: number, mode = 0, notFoundReason?: Reason): Promise<number> {
    try {
      return await openBeneath(this.root, this.relative(target), flags, mode);
    } catch (err) {
      throw confinedError(err, this.describe(target), notFoundReason);
    }
  }

  /** target's parent (relative to the root) and last name; the root itself has none. */
  private parentAndName(target: string): { parent: string; name: string } {
    const rel = this.relative(target);
    if (rel === '.') throw invalidArgument(`${this.root}: the root itself has no name in a parent here`, Reason.INVALID_PATH);
    return { parent: path.dirname(rel), name: path.basename(rel) };
  }

  /** Runs fn with an O_PATH fd of target's parent directory and target's last name. */
  private async inParent<T>(target: string, fn: (dirFd: number, name: string) => Promise<T>): Promise<T> {
    const rel = this.relative(target);
    if (rel === '.') throw invalidArgument(`${this.root}: the root itself has no name in a parent here`, Reason.INVALID_PATH);
    const parentFd = await this.openFd(path.dirname(path.resolve(this.root, rel)), O_PATH | fsc.O_DIRECTORY);
    try {
      return await fn(parentFd, path.basename(rel));
    } finally {
      await closeFd(parentFd);
    }
  }

  /** inParent for two names: one parent fd when both are in the same directory (a commit rename). */
  private inParents<T>(from: string, to: string, fn: (fromFd: number, fromName: string, toFd: number, toName: string) => Promise<T>): Promise<T> {
    if (path.dirname(path.resolve(this.root, this.relative(from))) === path.dirname(path.resolve(this.root, this.relative(to)))) {
      return this.inParent(from, (dirFd, fromName) => fn(dirFd, fromName, dirFd, path.basename(to)));
    }
    return this.inParent(from, (fromFd, fromName) => this.inParent(to, (toFd, toName) => fn(fromFd, fromName, toFd, toName)));
  }

  /** lstat of target (a symlink is reported as one, never followed); undefined if absent. */
  async lstat(target: string): Promise<Stats | undefined> {
    try {
      const steps = confinedSteps();
      if (steps) {
        const at = this.relative(target) === '.' ? { parent: '.', name: '' } : this.parentAndName(target);
        const raw = await steps.lstatBeneath(this.root, at.parent, at.name);
        return raw ? statsOf(raw) : undefined;
      }
      if (this.relative(target) === '.') {
        const fd = await this.openFd(this.root, O_PATH | fsc.O_DIRECTORY);
        try {
          return await fstatFd(fd);
        } finally {
          await closeFd(fd);
        }
      }
      return await this.inParent(target, (dirFd, name) => fs.lstat(procFd(dirFd, name)));
    } catch (err) {
      const e = confinedError(err, this.describe(target));
      if (e.code === GrpcStatus.NOT_FOUND) return undefined;
      throw e;
    }
  }

  async exists(target: string): Promise<boolean> {
    return (await this.lstat(target)) !== undefined;
  }

  /** The type of target without following it ('absent' if there is nothing). */
  async typeOf(target: string): Promise<EntryType | 'absent'> {
    const st = await this.lstat(target);
    return st ? typeOfStats(st) : 'absent';
  }

  /**
   * Lists a directory with lstat semantics. Entries whose type is not in `expect` (default:
   * files and directories) are skipped and reported, never followed.
   */
  async list(dir: string, expect: readonly EntryType[] = ['file', 'directory']): Promise<DirListing> {
    const fd = await this.openFd(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    const out: DirListing = { entries: [], skipped: [] };
    try {
      const dirents = await fs.readdir(procFd(fd), { withFileTypes: true });
      for (const d of dirents.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
        let type = typeOfDirent(d);
        if (type === undefined) {
          const st = await fs.lstat(procFd(fd, d.name)).catch(() => undefined);
          if (!st) continue; // gone meanwhile
          type = typeOfStats(st);
        }
        if (expect.includes(type)) out.entries.push({ name: d.name, type });
        else out.skipped.push({ name: d.name, type, reason: `${path.join(this.relative(dir), d.name)} is ${article(type)}: skipped` });
      }
    } catch (err) {
      throw confinedError(err, this.describe(dir));
    } finally {
      await closeFd(fd);
    }
    return out;
  }

  /** Names in a directory (expected types only); a missing directory lists as empty. */
  async listNames(dir: string, expect?: readonly EntryType[]): Promise<string[]> {
    try {
      return (await this.list(dir, expect)).entries.map((e) => e.name);
    } catch (err) {
      if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return [];
      throw err;
    }
  }

  /**
   * Opens an existing regular file. It is first opened O_PATH (a FIFO or device is never
   * really opened), its type checked, volume files checked for a single hard link, then
   * reopened through its own fd for reading (or reading and writing).
   */
  async openFile(target: string, opts: { kind?: FileKind; write?: boolean; notFoundReason?: Reason } = {}): Promise<fs.FileHandle> {
    return (await this.openChecked(target, opts)).handle;
  }

  /** openFile, and the size the file had when it was checked. */
  private async openChecked(
    target: string,
    opts: { kind?: FileKind; write?: boolean; notFoundReason?: Reason },
  ): Promise<{ handle: fs.FileHandle; size: number }> {
    const what = this.describe(target);
    const pathFd = await this.openFd(target, O_PATH, 0, opts.notFoundReason);
    try {
      const st = await fstatFd(pathFd);
      const type = typeOfStats(st);
      if (type !== 'file') throw unexpectedType(what, type, 'file');
      if ((opts.kind === 'volume' || opts.kind === 'record') && st.nlink > 1) {
        throw fail(Reason.HARD_LINK_REFUSED, `${what} has ${st.nlink} hard links (another name outside sdmesh's control may share it): refused`);
      }
      // Through the O_PATH fd's own /proc link: the very inode checked above, no name resolved again.
      return { handle: await fs.open(procFd(pathFd), opts.write ? 'r+' : 'r'), size: st.size };
    } catch (err) {
      throw confinedError(err, what, opts.notFoundReason);
    } finally {
      await closeFd(pathFd);
    }
  }

  /** Creates a new file (never an existing name), with sdmesh's mode and group. */
  async createFile(target: string, kind: FileKind): Promise<fs.FileHandle> {
    const fd = await this.createFileDescriptor(target, kind);
    try {
      return await fs.open(procFd(fd), 'r+');
    } catch (err) {
      throw confinedError(err, this.describe(target));
    } finally {
      await closeFd(fd);
    }
  }

  /**
   * createFile as the descriptor openat2 gave (read-write), for writers that only write,
   * truncate, fsync and close it (`descriptor`): the caller closes it. `data` is written at 0
   * before it resolves (not fsynced).
   */
  async createFileDescriptor(target: string, kind: FileKind, data?: Buffer): Promise<number> {
    const mode = kind === 'record' ? RECORD_FILE_MODE : VOLUME_FILE_MODE;
    const steps = confinedSteps();
    if (steps) {
      const created = await steps.createBeneath(this.root, this.relative(target), { mode, gid: storageGroupId, data, keepOpen: true }).catch((err: unknown) => {
        throw confinedError(err, this.describe(target));
      });
      return created.fd;
    }
    const fd = await this.openFd(target, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, mode);
    try {
      await applyOwnership(fd, mode);
      if (data) await descriptor.write(fd, data);
      return fd;
    } catch (err) {
      await closeFd(fd);
      throw confinedError(err, this.describe(target));
    }
  }

  /**
   * A new file (never an existing name, sdmesh's mode and group) written whole: data at 0 and/or
   * truncated to a size, fsynced and closed. Resolves to the bytes it allocates.
   */
  async writeNewFile(target: string, kind: FileKind, content: { data?: Buffer; truncateTo?: number }): Promise<number> {
    const steps = confinedSteps();
    if (steps) {
      const mode = kind === 'record' ? RECORD_FILE_MODE : VOLUME_FILE_MODE;
      const created = await steps
        .createBeneath(this.root, this.relative(target), { mode, gid: storageGroupId, ...content, sync: true })
        .catch((err: unknown) => {
          throw confinedError(err, this.describe(target));
        });
      return created.blocks * 512;
    }
    const fd = await this.createFileDescriptor(target, kind);
    try {
      if (content.data) await descriptor.write(fd, content.data);
      if (content.truncateTo !== undefined) await descriptor.truncate(fd, content.truncateTo);
      await descriptor.sync(fd);
      return (await descriptor.stat(fd)).blocks * 512;
    } catch (err) {
      throw confinedError(err, this.describe(target));
    } finally {
      await descriptor.close(fd);
    }
  }

  /** Creates a directory (mode 0770, sdmesh's group); `recursive` creates missing parents. */
  async mkdir(target: string, opts: { recursive?: boolean } = {}): Promise<void> {
    if (opts.recursive) {
      const rel = this.relative(target);
      if (rel === '.') return;
      const parent = path.dirname(path.resolve(this.root, rel));
      if (parent !== this.root && (await this.typeOf(parent)) === 'absent') await this.mkdir(parent, opts);
      if ((await this.typeOf(target)) === 'directory') return;
    }
    const steps = confinedSteps();
    if (steps) {
      const { parent, name } = this.parentAndName(target);
      return steps.mkdirBeneath(this.root, parent, name, DIRECTORY_MODE, storageGroupId).catch((err: unknown) => {
        throw confinedError(err, this.describe(target));
      });
    }
    await this.inParent(target, (dirFd, name) => fs.mkdir(procFd(dirFd, name), DIRECTORY_MODE)).catch((err: unknown) => {
      throw confinedError(err, this.describe(target));
    });
    await this.setDirectoryOwnership(target);
  }

  /** Gives a directory sdmesh's mode (0770) and group. */
  async setDirectoryOwnership(dir: string): Promise<void> {
    const fd = await this.openFd(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    try {
      await applyOwnership(fd, DIRECTORY_MODE);
    } catch (err) {
      throw confinedError(err, this.describe(dir));
    } finally {
      await closeFd(fd);
    }
  }

  /** Removes one non-directory name (a symlink itself, never what it points to). */
  async unlink(target: string): Promise<void> {
    await this.inParent(target, (dirFd, name) => fs.unlink(procFd(dirFd, name))).catch((err: unknown) => {
      throw confinedError(err, this.describe(target));
    });
  }

  /** Removes one empty directory. */
  async rmdir(target: string): Promise<void> {
    await this.inParent(target, (dirFd, name) => fs.rmdir(procFd(dirFd, name))).catch((err: unknown) => {
      throw confinedError(err, this.describe(target));
    });
  }

  /** rename(2) of one name to another, both under the root. */
  async rename(from: string, to: string): Promise<void> {
    const steps = confinedSteps();
    if (steps) {
      const a = this.parentAndName(from);
      const b = this.parentAndName(to);
      return steps.renameBeneath(this.root, a.parent, a.name, b.parent, b.name).catch((err: unknown) => {
        throw confinedError(err, `rename of ${this.describe(from)} to ${path.basename(to)}`);
      });
    }
    await this.inParents(from, to, (fromFd, fromName, toFd, toName) => fs.rename(procFd(fromFd, fromName), procFd(toFd, toName))).catch((err: unknown) => {
      throw confinedError(err, `rename of ${this.describe(from)} to ${path.basename(to)}`);
    });
  }

  /** link(2) (never follows a symlink at `from`); fails if `to` exists. */
  async link(from: string, to: string): Promise<void> {
    await this.inParents(from, to, (fromFd, fromName, toFd, toName) => fs.link(procFd(fromFd, fromName), procFd(toFd, toName))).catch((err: unknown) => {
      throw confinedError(err, `link of ${this.describe(from)} to ${path.basename(to)}`);
    });
  }

  /** fsyncs a directory so a rename or create inside it is durable. */
  async fsyncDir(dir: string): Promise<void> {
    const steps = confinedSteps();
    if (steps) {
      return steps.syncBeneath(this.root, this.relative(dir), fsc.O_RDONLY | fsc.O_DIRECTORY).catch((err: unknown) => {
        throw confinedError(err, this.describe(dir));
      });
    }
    const fd = await this.openFd(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    try {
      await descriptor.sync(fd);
    } catch (err) {
      throw confinedError(err, this.describe(dir));
    } finally {
      await closeFd(fd);
    }
  }

  async fsyncFile(file: string, kind: FileKind = 'volume'): Promise<void> {
    const handle = await this.openFile(file, { kind, write: true });
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  /** Reads a small file whole (at most maxBytes + 1 bytes, so an oversized one is detectable). */
  async readSmallFile(file: string, maxBytes: number, opts: { kind?: FileKind; notFoundReason?: Reason } = {}): Promise<Buffer> {
    const { handle, size } = await this.openChecked(file, { kind: opts.kind ?? 'record', notFoundReason: opts.notFoundReason });
    try {
      const buf = Buffer.alloc(maxBytes + 1);
      let length = 0;
      for (;;) {
        const { bytesRead } = await handle.read(buf, length, buf.length - length, length);
        if (bytesRead === 0) break;
        length += bytesRead;
        // The whole file as it was when checked: no read more to see its end.
        if (length === buf.length || length === size) break;
      }
      return buf.subarray(0, length);
    } catch (err) {
      throw confinedError(err, this.describe(file), opts.notFoundReason);
    } finally {
      await handle.close();
    }
  }

  /**
   * Writes a whole record atomically: temp file (exclusive create, mode 0640) + write + fsync,
   * then rename (or link for noReplace) over the target, then fsync the directory. A reader
   * sees the old file or the new one, never a mix; after a crash the temp file is garbage.
   */
  async writeFileAtomic(target: string, data: Buffer, opts: AtomicWriteOptions): Promise<void> {
    const temp = target + opts.tempSuffix;
    let fd: number;
    try {
      fd = await this.createFileDescriptor(temp, 'record', data);
    } catch (err) {
      // A name that was there already is not ours; what a failed write left is.
      if (SdmeshError.from(err).reason !== Reason.ALREADY_EXISTS) await this.unlink(temp).catch(() => undefined);
      throw err;
    }
    try {
      await descriptor.syncAndClose(fd);
      await opts.beforeCommit?.();
      if (opts.noReplace) {
        await this.link(temp, target);
        await this.unlink(temp);
      } else {
        await this.rename(temp, target);
      }
    } catch (err) {
      await this.unlink(temp).catch(() => undefined);
      throw err;
    }
    await this.fsyncDir(path.dirname(path.resolve(this.root, this.relative(target))));
  }
}

/** The type of an lstat result, for callers that stat through ConfinedRoot. */
export const entryTypeOf = typeOfStats;
