import fs from 'node:fs/promises';
import path from 'node:path';
import { GrpcStatus, SdmeshError } from '../errors';
import { MAX_RECORD_BYTES } from './records';

/** fsyncs a directory so a rename or create inside it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export async function fsyncFile(file: string): Promise<void> {
  const handle = await fs.open(file, 'r+');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export interface AtomicWriteOptions {
  /** Suffix of the temporary file beside the target, e.g. `.tx-<txid>`: unique per writer. */
  tempSuffix: string;
  /** Called after the temp file is durable and before it becomes visible (a fault point). */
  beforeCommit?: () => void | Promise<void>;
  /** Refuse to replace an existing target (commit with link(2), which fails on EEXIST). */
  noReplace?: boolean;
}

/**
 * Writes a whole file atomically: temp file (exclusive create) + write + fsync, then rename
 * (or link for noReplace) over the target, then fsync the directory. A reader sees the old
 * file or the new one, never a mix; after a crash the temp file is garbage.
 */
export async function writeFileAtomic(target: string, data: Buffer, opts: AtomicWriteOptions): Promise<void> {
  const temp = target + opts.tempSuffix;
  const handle = await fs.open(temp, 'wx', 0o644);
  try {
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await opts.beforeCommit?.();
    if (opts.noReplace) {
      await fs.link(temp, target);
      await fs.unlink(temp);
    } else {
      await fs.rename(temp, target);
    }
  } catch (err) {
    await fs.rm(temp, { force: true }).catch(() => undefined);
    throw err;
  }
  await fsyncDir(path.dirname(target));
}

/**
 * Reads a small record file whole. Missing → NOT_FOUND (notFoundReason); larger than a record
 * can be → DATA_LOSS FOREIGN_RECORD (read no further than that).
 */
export async function readRecordFile(file: string, notFoundReason: string, what: string): Promise<Buffer> {
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, 'r');
  } catch (err) {
    throw ioError(err, `${what} ${file}`, notFoundReason);
  }
  try {
    const buf = Buffer.alloc(MAX_RECORD_BYTES + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buf, length, buf.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
      if (length === buf.length) break;
    }
    return buf.subarray(0, length);
  } catch (err) {
    throw ioError(err, `${what} ${file}`, notFoundReason);
  } finally {
    await handle.close();
  }
}

/** Maps a Node fs error to an SdmeshError with a clear message. */
export function ioError(err: unknown, what: string, notFoundReason = 'NOT_FOUND'): SdmeshError {
  if (err instanceof SdmeshError) return err;
  const code = (err as NodeJS.ErrnoException)?.code;
  const detail = err instanceof Error ? err.message : String(err);
  switch (code) {
    case 'ENOENT':
      return new SdmeshError(GrpcStatus.NOT_FOUND, `${what} does not exist`, notFoundReason);
    case 'EEXIST':
    case 'ENOTEMPTY':
      return new SdmeshError(GrpcStatus.ALREADY_EXISTS, `${what} already exists`, 'ALREADY_EXISTS');
    case 'ENOSPC':
    case 'EDQUOT':
      return new SdmeshError(GrpcStatus.RESOURCE_EXHAUSTED, `${what}: no space left on the storage`, 'NO_SPACE');
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return new SdmeshError(GrpcStatus.PERMISSION_DENIED, `${what}: ${detail}`, 'STORAGE_PERMISSION_DENIED');
    case 'EIO':
    case 'ESTALE':
    case 'ETIMEDOUT':
    case 'ENOTCONN':
      return new SdmeshError(GrpcStatus.UNAVAILABLE, `${what}: storage I/O error: ${detail}`, 'STORAGE_IO_ERROR');
    case 'ENOTDIR':
    case 'EISDIR':
      return new SdmeshError(GrpcStatus.FAILED_PRECONDITION, `${what}: unexpected file type: ${detail}`, 'UNEXPECTED_FILE_TYPE');
    default:
      return SdmeshError.from(err);
  }
}
