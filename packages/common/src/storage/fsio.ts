import path from 'node:path';
import { GrpcStatus, SdmeshError } from '../errors';
import { MAX_RECORD_BYTES } from './records';
import { ConfinedRoot, confinedError, type AtomicWriteOptions, type FileKind } from './confined';
import { fail, Reason } from '../reasons';

// Path-taking helpers for callers outside a domain's layout (and tests). Each is confined to
// the file's own directory: no component of the path may be a symlink, and the last name is
// never followed (see confined.ts). Domain code uses ConfinedRoot on the domain root.

/** fsyncs a directory so a rename or create inside it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  await new ConfinedRoot(dir).fsyncDir(dir);
}

export async function fsyncFile(file: string): Promise<void> {
  await new ConfinedRoot(path.dirname(file)).fsyncFile(file, 'file');
}

/**
 * Writes a whole file atomically: temp file (exclusive create) + write + fsync, then rename
 * (or link for noReplace) over the target, then fsync the directory. A reader sees the old
 * file or the new one, never a mix; after a crash the temp file is garbage.
 */
export async function writeFileAtomic(target: string, data: Buffer, opts: AtomicWriteOptions): Promise<void> {
  await new ConfinedRoot(path.dirname(target)).writeFileAtomic(target, data, opts);
}

/**
 * Reads a small record file whole. Missing → NOT_FOUND (notFoundReason); larger than a record
 * can be → DATA_LOSS FOREIGN_RECORD (read no further than that).
 */
export async function readRecordFile(file: string, notFoundReason: Reason, what: string, kind: FileKind = 'record'): Promise<Buffer> {
  try {
    return await new ConfinedRoot(path.dirname(file)).readSmallFile(file, MAX_RECORD_BYTES, { kind, notFoundReason });
  } catch (err) {
    const e = ioError(err, `${what} ${file}`, notFoundReason);
    throw e.code === GrpcStatus.NOT_FOUND || e.reason === notFoundReason ? fail(notFoundReason, `${what} ${file} does not exist`) : e;
  }
}

/** Maps a Node fs error to an SdmeshError with a clear message (the same mapping as confined calls). */
export function ioError(err: unknown, what: string, notFoundReason: Reason = Reason.NOT_FOUND): SdmeshError {
  return confinedError(err, what, notFoundReason);
}
