import fs, { type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import {
  checkQcow2Header,
  ConfinedRoot,
  failedPrecondition,
  FIRST_CHILD_FD,
  GrpcStatus,
  hasQcow2Magic,
  imageSpec,
  invalidArgument,
  MAX_CAPACITY_BYTES,
  notFound,
  SdmeshError,
  Reason,
} from '@sdmesh/common/worker';
import { runQemuImg } from './qemu';

/**
 * An import source: a plain file on this host (not a volume, so no lease protects it; the
 * caller owns it). Everything here is about reading it without surprises:
 * - imports are off unless the host names import directories (--import-dirs); the file must
 *   lie beneath one of them, and /proc, /sys, /dev and storage domains never qualify;
 * - the path must be absolute and normalized, so what is checked is what is read;
 * - it is opened once, beneath its import directory with openat2 (no symlink in any
 *   component, no other file system), must be a regular file, and is then inspected and
 *   copied from that same descriptor: renaming another file over the name afterwards changes
 *   nothing, and a file that changed since the service accepted the job is refused;
 * - its format is read from its own first bytes (qcow2 magic, else raw) and stated to
 *   qemu-img with -f; a qcow2 file with a backing file, an external data file or encryption
 *   is refused, and qemu-img opens it through a `json:` spec with `"backing": null`.
 */
export interface SourceFile {
  /** The path as given (validated). */
  path: string;
  format: 'RAW' | 'QCOW2';
  virtualSize: number;
  actualSize: number;
  fileSize: number;
  /** What the handle is: compared when the copy worker opens the file again. */
  identity: SourceIdentity;
}

export interface SourceIdentity {
  dev: number;
  ino: number;
  size: number;
  mtimeMs: number;
}

/** An inspected source with its open descriptor (the caller closes it). */
export interface OpenedSourceFile extends SourceFile {
  handle: FileHandle;
}

/** Never import sources, whatever the configuration says. */
const FORBIDDEN_IMPORT_TREES = ['/proc', '/sys', '/dev'];

const within = (dir: string, p: string) => p === dir || p.startsWith(dir === '/' ? '/' : dir + '/');

/**
 * Validates the configured import directories once at start: absolute, existing directories,
 * resolved to their real path (the admin's symlinks are resolved here, never at import time),
 * not /, not under or containing /proc, /sys or /dev.
 */
export async function resolveImportDirs(list: string): Promise<string[]> {
  const out: string[] = [];
  for (const raw of list
    .split(',')
    .map((d) => d.trim())
    .filter(Boolean)) {
    if (!path.isAbsolute(raw)) throw new Error(`import directory ${JSON.stringify(raw)} is not absolute`);
    const real = await fs.realpath(raw).catch((err: Error) => {
      throw new Error(`import directory ${raw}: ${err.message}`);
    });
    if (!(await fs.stat(real)).isDirectory()) throw new Error(`import directory ${raw} is not a directory`);
    if (real === '/') throw new Error('import directory / is refused: it contains /proc, /sys, /dev and every storage domain');
    for (const t of FORBIDDEN_IMPORT_TREES) {
      if (within(t, real) || within(real, t)) throw new Error(`import directory ${raw} is or contains ${t}: refused`);
    }
    out.push(real);
  }
  return out;
}

/** Longest source path accepted (PATH_MAX). */
const MAX_PATH = 4096;

/** Syntax only (INVALID_ARGUMENT INVALID_SOURCE_PATH); touches nothing. */
export function validateSourcePath(value: unknown): string {
  const bad = (why: string) => invalidArgument(`source file ${JSON.stringify(String(value).slice(0, 200))} ${why}`, Reason.INVALID_SOURCE_PATH);
  if (typeof value !== 'string' || value.length === 0) throw invalidArgument('source file path is empty', Reason.INVALID_SOURCE_PATH);
  if (value.length > MAX_PATH) throw bad(`is longer than ${MAX_PATH} characters`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(value)) throw bad('contains control characters');
  if (!path.isAbsolute(value)) throw bad('is not an absolute path');
  const segments = value.split('/').slice(1);
  if (segments.includes('..') || segments.includes('.')) throw bad('contains "." or ".." segments');
  if (path.posix.normalize(value) !== value || value.endsWith('/')) throw bad('is not normalized (double or trailing slash)');
  if (value === '/') throw bad('is the root directory');
  return value;
}

/** The storage domain the file lies in (a directory with dom_md/metadata, links not followed), if any. */
async function enclosingDomain(file: string): Promise<string | undefined> {
  for (let dir = path.dirname(file); ; dir = path.dirname(dir)) {
    if (path.basename(dir) === 'dom_md') return path.dirname(dir);
    const md = await fs.lstat(path.join(dir, 'dom_md', 'metadata')).catch(() => undefined);
    if (md) return dir;
    if (dir === '/') return undefined;
  }
}

interface QemuInfo {
  format?: string;
  'virtual-size'?: number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  encrypted?: boolean;
  'format-specific'?: { data?: { 'data-file'?: string } };
}

/**
 * Opens and inspects a source file. Codes: INVALID_ARGUMENT INVALID_SOURCE_PATH (syntax),
 * FAILED_PRECONDITION IMPORT_DISABLED (no import directories), SOURCE_OUTSIDE_IMPORT_DIRS,
 * SYMLINK_REFUSED / OUTSIDE_DOMAIN (a link or mount on the way), NOT_FOUND SOURCE_NOT_FOUND,
 * FAILED_PRECONDITION SOURCE_NOT_REGULAR_FILE, SOURCE_IN_STORAGE_DOMAIN, SOURCE_EMPTY,
 * SOURCE_TOO_LARGE, SOURCE_HAS_BACKING_FILE, SOURCE_HAS_DATA_FILE, SOURCE_ENCRYPTED,
 * SOURCE_UNREADABLE_IMAGE, SOURCE_CHANGED (not the file `expect` describes).
 */
export async function openSourceFile(
  value: unknown,
  importDirs: readonly string[],
  opts: { signal?: AbortSignal; expect?: SourceIdentity } = {},
): Promise<OpenedSourceFile> {
  const given = validateSourcePath(value);
  if (importDirs.length === 0) {
    throw failedPrecondition('imports are disabled on this host: it names no import directories (--import-dirs / SDMESH_IMPORT_DIRS)', Reason.IMPORT_DISABLED);
  }
  if (FORBIDDEN_IMPORT_TREES.some((t) => within(t, given)))
    throw failedPrecondition(`source file ${given} is under /proc, /sys or /dev: never imported`, Reason.SOURCE_OUTSIDE_IMPORT_DIRS);
  const dir = importDirs.find((d) => given.startsWith(d + '/'));
  if (!dir)
    throw failedPrecondition(
      `source file ${given} is not inside an import directory of this host (${importDirs.join(', ')})`,
      Reason.SOURCE_OUTSIDE_IMPORT_DIRS,
    );
  const domain = await enclosingDomain(given);
  if (domain) {
    throw failedPrecondition(
      `source file ${given} is inside storage domain ${domain}: volumes are copied with CopyDisk under their leases, domain metadata is never imported`,
      Reason.SOURCE_IN_STORAGE_DOMAIN,
    );
  }
  let handle: FileHandle;
  try {
    handle = await new ConfinedRoot(dir).openFile(given, { kind: 'file', notFoundReason: Reason.SOURCE_NOT_FOUND });
  } catch (err) {
    const e = SdmeshError.from(err);
    if (e.reason === Reason.UNEXPECTED_FILE_TYPE)
      throw failedPrecondition(`source ${given}: ${e.message}; only regular files can be imported`, Reason.SOURCE_NOT_REGULAR_FILE);
    if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`source file ${given} does not exist on this host`, Reason.SOURCE_NOT_FOUND);
    throw e;
  }
  try {
    const inspected = await inspectOpened(handle, given, opts.signal);
    const want = opts.expect;
    const got = inspected.identity;
    if (want && (want.dev !== got.dev || want.ino !== got.ino || want.size !== got.size || want.mtimeMs !== got.mtimeMs)) {
      throw failedPrecondition(
        `source file ${given} is not the file inspected when the import was accepted (replaced or modified since): refused`,
        Reason.SOURCE_CHANGED,
      );
    }
    return { ...inspected, handle };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/** Opens, inspects and closes (InspectFile and the service's check before it queues a job). */
export async function inspectSourceFile(value: unknown, importDirs: readonly string[], signal?: AbortSignal): Promise<SourceFile> {
  const { handle, ...file } = await openSourceFile(value, importDirs, { signal });
  await handle.close();
  return file;
}

async function inspectOpened(handle: FileHandle, given: string, signal?: AbortSignal): Promise<SourceFile> {
  const st = await handle.stat();
  if (st.size === 0) throw failedPrecondition(`source file ${given} is empty`, Reason.SOURCE_EMPTY);
  if (st.size > MAX_CAPACITY_BYTES) throw failedPrecondition(`source file ${given} is larger than 64 TiB`, Reason.SOURCE_TOO_LARGE);
  // The format comes from the file's own first bytes, not from qemu-img's probing.
  const format = (await hasQcow2Magic(handle)) ? 'QCOW2' : 'RAW';
  if (format === 'QCOW2') {
    await checkQcow2Header(handle, `source file ${given}`).catch((err: unknown) => {
      const e = SdmeshError.from(err);
      const reason =
        e.reason === Reason.IMAGE_HAS_DATA_FILE
          ? Reason.SOURCE_HAS_DATA_FILE
          : e.reason === Reason.IMAGE_ENCRYPTED
            ? Reason.SOURCE_ENCRYPTED
            : Reason.SOURCE_UNREADABLE_IMAGE;
      throw failedPrecondition(e.message, reason);
    });
  }
  let info: QemuInfo;
  try {
    const { stdout } = await runQemuImg(['info', '-U', '--output=json', '-f', format.toLowerCase(), sourceFileSpec(format)], { signal, files: [handle] });
    info = JSON.parse(stdout) as QemuInfo;
  } catch (err) {
    if (signal?.aborted) throw err;
    const e = SdmeshError.from(err);
    throw failedPrecondition(`qemu-img cannot read ${given}: ${e.message}`, Reason.SOURCE_UNREADABLE_IMAGE);
  }
  if (info['backing-filename'] || info['full-backing-filename']) {
    throw failedPrecondition(
      `source file ${given} has a backing file (${info['backing-filename'] ?? info['full-backing-filename']}): flatten it first (qemu-img convert); an import never follows a backing link`,
      Reason.SOURCE_HAS_BACKING_FILE,
    );
  }
  if (info['format-specific']?.data?.['data-file'])
    throw failedPrecondition(`source file ${given} keeps its data in an external data file: refused`, Reason.SOURCE_HAS_DATA_FILE);
  if (info.encrypted) throw failedPrecondition(`source file ${given} is encrypted: refused`, Reason.SOURCE_ENCRYPTED);
  const virtualSize = info['virtual-size'] ?? 0;
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0)
    throw failedPrecondition(`source file ${given} has no content (virtual size ${virtualSize})`, Reason.SOURCE_EMPTY);
  if (virtualSize > MAX_CAPACITY_BYTES) throw failedPrecondition(`source file ${given} has a virtual size over 64 TiB`, Reason.SOURCE_TOO_LARGE);
  return {
    path: given,
    format,
    virtualSize,
    actualSize: info['actual-size'] ?? st.blocks * 512,
    fileSize: st.size,
    identity: { dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs },
  };
}

/**
 * The `json:` spec qemu-img opens an import source through (the child's fd 3): the stated
 * driver, and no backing file whatever the header says.
 */
export function sourceFileSpec(format: 'RAW' | 'QCOW2', fd = FIRST_CHILD_FD): string {
  return imageSpec([{ fd, format }]);
}
