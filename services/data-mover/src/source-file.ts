import { constants as fsc } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { failedPrecondition, invalidArgument, MAX_CAPACITY_BYTES, notFound, SdmeshError } from '@sdmesh/common';
import { runQemuImg } from './qemu';

/**
 * An import source: a plain file on this host (not a volume, so no lease protects it; the
 * caller owns it). Everything here is about reading it without surprises:
 * - the path must be absolute and already normalized (no `.`/`..` segments, no `//`, no
 *   trailing slash), so what is checked is what is read;
 * - it must resolve (symlinks followed) to a readable regular file outside every storage
 *   domain — volumes are copied with CopyDisk under their leases, and a domain's `dom_md`
 *   (lease areas, metadata) must never be read as a disk;
 * - qemu-img info runs with `-U` (the file may be open elsewhere) and without `--backing-chain`
 *   (it opens nothing but the file); a file with a backing file, an external data file or
 *   encryption is refused: following a backing link named inside a user-supplied image would
 *   read another file of the host. The copy itself opens the file through a `json:` spec with
 *   `"backing": null`, so even a file swapped after the check cannot make qemu-img open one.
 */
export interface SourceFile {
  /** The path as given (validated). */
  path: string;
  /** The file it resolves to (symlinks followed): what qemu-img reads. */
  realPath: string;
  format: 'RAW' | 'QCOW2';
  virtualSize: number;
  actualSize: number;
  fileSize: number;
}

/** Longest source path accepted (PATH_MAX). */
const MAX_PATH = 4096;

/** Syntax only (INVALID_ARGUMENT INVALID_SOURCE_PATH); touches nothing. */
export function validateSourcePath(value: unknown): string {
  const bad = (why: string) => invalidArgument(`source file ${JSON.stringify(String(value).slice(0, 200))} ${why}`, 'INVALID_SOURCE_PATH');
  if (typeof value !== 'string' || value.length === 0) throw invalidArgument('source file path is empty', 'INVALID_SOURCE_PATH');
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

/** Is `dir` (or an ancestor) a storage domain? Returns the domain directory or undefined. */
async function enclosingDomain(file: string): Promise<string | undefined> {
  for (let dir = path.dirname(file); ; dir = path.dirname(dir)) {
    if (path.basename(dir) === 'dom_md') return path.dirname(dir);
    const md = await fs.stat(path.join(dir, 'dom_md', 'metadata')).catch(() => undefined);
    if (md?.isFile()) return dir;
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
 * Validates and inspects a source file. Codes: INVALID_ARGUMENT INVALID_SOURCE_PATH (syntax),
 * NOT_FOUND SOURCE_NOT_FOUND, FAILED_PRECONDITION SOURCE_NOT_REGULAR_FILE,
 * SOURCE_NOT_READABLE, SOURCE_IN_STORAGE_DOMAIN, SOURCE_EMPTY, SOURCE_TOO_LARGE,
 * SOURCE_UNSUPPORTED_FORMAT, SOURCE_HAS_BACKING_FILE, SOURCE_HAS_DATA_FILE, SOURCE_ENCRYPTED,
 * SOURCE_UNREADABLE_IMAGE (qemu-img cannot open it).
 */
export async function inspectSourceFile(value: unknown, signal?: AbortSignal): Promise<SourceFile> {
  const given = validateSourcePath(value);
  const realPath = await fs.realpath(given).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') throw notFound(`source file ${given} does not exist on this host`, 'SOURCE_NOT_FOUND');
    if (err.code === 'EACCES') throw failedPrecondition(`source file ${given} cannot be reached (permission denied on a directory)`, 'SOURCE_NOT_READABLE');
    throw failedPrecondition(`source file ${given}: ${err.message}`, 'SOURCE_NOT_READABLE');
  });
  const st = await fs.stat(realPath);
  if (!st.isFile()) {
    const what = st.isDirectory() ? 'a directory' : st.isBlockDevice() ? 'a block device' : 'not a regular file';
    throw failedPrecondition(`source ${given} is ${what}: only regular files can be imported`, 'SOURCE_NOT_REGULAR_FILE');
  }
  await fs.access(realPath, fsc.R_OK).catch(() => {
    throw failedPrecondition(`source file ${given} is not readable by the data-mover`, 'SOURCE_NOT_READABLE');
  });
  const domain = await enclosingDomain(realPath);
  if (domain) {
    throw failedPrecondition(
      `source file ${given} is inside storage domain ${domain}: volumes are copied with CopyDisk under their leases, domain metadata is never imported`,
      'SOURCE_IN_STORAGE_DOMAIN',
    );
  }
  if (st.size === 0) throw failedPrecondition(`source file ${given} is empty`, 'SOURCE_EMPTY');
  if (st.size > MAX_CAPACITY_BYTES) throw failedPrecondition(`source file ${given} is larger than 64 TiB`, 'SOURCE_TOO_LARGE');
  let info: QemuInfo;
  try {
    // No --backing-chain: qemu-img opens only this file.
    const { stdout } = await runQemuImg(['info', '-U', '--output=json', realPath], { signal });
    info = JSON.parse(stdout) as QemuInfo;
  } catch (err) {
    if (signal?.aborted) throw err;
    const e = SdmeshError.from(err);
    throw failedPrecondition(`qemu-img cannot read ${given}: ${e.message}`, 'SOURCE_UNREADABLE_IMAGE');
  }
  const format = info.format === 'raw' ? 'RAW' : info.format === 'qcow2' ? 'QCOW2' : undefined;
  if (!format) throw failedPrecondition(`source file ${given} is ${info.format ?? 'of an unknown format'}: only raw and qcow2 can be imported`, 'SOURCE_UNSUPPORTED_FORMAT');
  if (info['backing-filename'] || info['full-backing-filename']) {
    throw failedPrecondition(
      `source file ${given} has a backing file (${info['backing-filename'] ?? info['full-backing-filename']}): flatten it first (qemu-img convert); an import never follows a backing link`,
      'SOURCE_HAS_BACKING_FILE',
    );
  }
  if (info['format-specific']?.data?.['data-file']) throw failedPrecondition(`source file ${given} keeps its data in an external data file: refused`, 'SOURCE_HAS_DATA_FILE');
  if (info.encrypted) throw failedPrecondition(`source file ${given} is encrypted: refused`, 'SOURCE_ENCRYPTED');
  const virtualSize = info['virtual-size'] ?? 0;
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0) throw failedPrecondition(`source file ${given} has no content (virtual size ${virtualSize})`, 'SOURCE_EMPTY');
  if (virtualSize > MAX_CAPACITY_BYTES) throw failedPrecondition(`source file ${given} has a virtual size over 64 TiB`, 'SOURCE_TOO_LARGE');
  return { path: given, realPath, format, virtualSize, actualSize: info['actual-size'] ?? st.blocks * 512, fileSize: st.size };
}

/**
 * The `json:` image spec qemu-img opens the source through: the detected driver, the file,
 * and no backing file whatever the header says.
 */
export function sourceFileSpec(file: Pick<SourceFile, 'realPath' | 'format'>): string {
  const spec: Record<string, unknown> = { driver: file.format.toLowerCase(), file: { driver: 'file', filename: file.realPath } };
  if (file.format === 'QCOW2') spec.backing = null;
  return 'json:' + JSON.stringify(spec);
}
