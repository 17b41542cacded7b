import fs from 'node:fs';
import path from 'node:path';
import { BASE_ALLOCATION, NBD_STATE_ZERO } from '@sdmesh/common';
import { isRetryable, type TransferEndpoint } from './endpoint';
import { createImage, LocalImage, type LocalFormat } from './local-image';

/**
 * Upload, download and backup over a transfer endpoint, sparse-aware: only data crosses the wire;
 * zero ranges are skipped (or zeroed with one PATCH where the target may hold data). Each request
 * moves one segment; a dropped connection is retried from the last segment the server acknowledged.
 */

export const SEGMENT = 8 * 1024 * 1024;
/** Requests in flight: enough to overlap the network with the reads and writes at both ends. */
export const CONCURRENCY = 4;

export interface TransferProgress {
  /** Data bytes moved so far and in all (zeros excluded). */
  done: number;
  total: number;
}

export interface TransferOptions {
  onProgress?: (p: TransferProgress) => void;
  /** Attempts per segment after a dropped connection (default 5). */
  retries?: number;
  /** Bytes per request (default 8 MiB). */
  segment?: number;
  /** Requests in flight (default 4). */
  concurrency?: number;
  signal?: AbortSignal;
}

export interface TransferResult {
  /** Guest bytes sent or received as data. */
  dataBytes: number;
  /** Bytes zeroed on the target by request (upload) or written as zeros locally. */
  zeroedBytes: number;
  /** Zero bytes skipped: nothing sent or written for them. */
  skippedBytes: number;
  /** Requests retried after a dropped connection. */
  retried: number;
}

interface Range {
  start: number;
  end: number;
}

/** [start, end) minus the given sorted ranges. */
function subtract(r: Range, holes: Range[]): Range[] {
  const out: Range[] = [];
  let at = r.start;
  for (const h of holes) {
    if (h.end <= at || h.start >= r.end) continue;
    if (h.start > at) out.push({ start: at, end: h.start });
    at = Math.max(at, h.end);
  }
  if (at < r.end) out.push({ start: at, end: r.end });
  return out;
}

/** [start, end) cut by the given sorted ranges: the parts inside them. */
function intersect(r: Range, with_: Range[]): Range[] {
  return with_.filter((w) => w.end > r.start && w.start < r.end).map((w) => ({ start: Math.max(w.start, r.start), end: Math.min(w.end, r.end) }));
}

async function withRetries<T>(what: string, opts: TransferOptions, result: TransferResult, fn: () => Promise<T>): Promise<T> {
  const attempts = (opts.retries ?? 5) + 1;
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i >= attempts || !isRetryable(err) || opts.signal?.aborted) throw err;
      result.retried++;
      await new Promise((r) => setTimeout(r, Math.min(5000, 200 * 2 ** (i - 1))));
    }
  }
}

const ZEROS = Buffer.alloc(SEGMENT);
/** A segment of zeros (memcmp against a zero buffer: cheap next to the network). */
const isAllZero = (b: Buffer) => (b.length <= ZEROS.length ? ZEROS.subarray(0, b.length).equals(b) : b.every((x) => x === 0));

/**
 * Uploads a local raw or qcow2 file's guest data into the transfer's disk. Zero extents of the file
 * are not sent; where the disk is not already zero there, one PATCH zero clears it.
 */
export async function upload(endpoint: TransferEndpoint, file: string, format: LocalFormat, opts: TransferOptions = {}): Promise<TransferResult> {
  const result: TransferResult = { dataBytes: 0, zeroedBytes: 0, skippedBytes: 0, retried: 0 };
  const src = await LocalImage.open(file, format, { write: false });
  try {
    const target = await endpoint.options();
    if (src.size > target.size) throw new Error(`${file} holds ${src.size} guest bytes, more than the disk's ${target.size}`);
    const targetData = (await endpoint.zeroExtents()).filter((e) => !e.zero).map((e) => ({ start: e.start, end: e.start + e.length }));
    const extents = await src.nbd.extents(BASE_ALLOCATION);
    const total = extents.filter((e) => !(e.flags & NBD_STATE_ZERO)).reduce((s, e) => s + e.length, 0);
    const segment = opts.segment ?? SEGMENT;
    let done = 0;
    const zeroOnTarget = async (r: Range) => {
      const onTarget = intersect(r, targetData);
      for (const z of onTarget) {
        await withRetries('zero', opts, result, () => endpoint.zero(z.start, z.end - z.start));
        result.zeroedBytes += z.end - z.start;
      }
      result.skippedBytes += r.end - r.start - onTarget.reduce((s, z) => s + z.end - z.start, 0);
    };
    function* tasks(): Generator<() => Promise<void>> {
      for (const e of extents) {
        const r = { start: e.offset, end: e.offset + e.length };
        if (e.flags & NBD_STATE_ZERO) {
          yield () => zeroOnTarget(r);
          continue;
        }
        for (let at = r.start; at < r.end; at += segment) {
          const start = at;
          const end = Math.min(r.end, at + segment);
          yield async () => {
            const data = await src.nbd.read(start, end - start);
            // Data that is all zeros (a raw file's written zeros) travels as a zero range too.
            if (isAllZero(data)) await zeroOnTarget({ start, end });
            else {
              await withRetries('write', opts, result, () => endpoint.write(start, data));
              result.dataBytes += data.length;
            }
            done += end - start;
            opts.onProgress?.({ done, total });
          };
        }
      }
      // The tail beyond the file (a disk larger than the image) must read as zeros too.
      if (src.size < target.size) yield () => zeroOnTarget({ start: src.size, end: target.size });
    }
    await runPool(tasks(), opts, 'upload');
    await withRetries('flush', opts, result, () => endpoint.flush());
    return result;
  } finally {
    await src.close();
  }
}

/**
 * Runs tasks with up to `concurrency` in flight (each holds one segment: memory stays bounded),
 * so the network, the endpoint's writes and the local reads overlap. The first failure stops it.
 */
async function runPool(tasks: Iterator<() => Promise<void>>, opts: TransferOptions, what: string): Promise<void> {
  let failure: { err: unknown } | undefined;
  const worker = async () => {
    while (!failure) {
      if (opts.signal?.aborted) throw new Error(`${what} interrupted`);
      const next = tasks.next();
      if (next.done) return;
      try {
        await next.value();
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: opts.concurrency ?? CONCURRENCY }, worker));
  if (failure) throw failure.err;
}

/** Reads ranges of the disk into a local image, in segments, each retried after a dropped connection. */
async function copyRanges(endpoint: TransferEndpoint, dst: LocalImage, ranges: Range[], opts: TransferOptions, result: TransferResult): Promise<void> {
  const segment = opts.segment ?? SEGMENT;
  const total = ranges.reduce((s, r) => s + r.end - r.start, 0);
  let done = 0;
  function* tasks(): Generator<() => Promise<void>> {
    for (const r of ranges) {
      for (let at = r.start; at < r.end; at += segment) {
        const start = at;
        const end = Math.min(r.end, at + segment);
        yield async () => {
          const data = await withRetries('read', opts, result, () => endpoint.read(start, end));
          await dst.nbd.write(start, data);
          result.dataBytes += data.length;
          done += data.length;
          opts.onProgress?.({ done, total });
        };
      }
    }
  }
  await runPool(tasks(), opts, 'download');
}

/** Downloads the disk's guest data into a new local raw (sparse) or qcow2 file: only non-zero extents are read. */
export async function download(endpoint: TransferEndpoint, file: string, format: LocalFormat, opts: TransferOptions = {}): Promise<TransferResult> {
  const result: TransferResult = { dataBytes: 0, zeroedBytes: 0, skippedBytes: 0, retried: 0 };
  const { size } = await endpoint.options();
  const extents = await endpoint.zeroExtents();
  await intoNewImage(file, format, size, undefined, async (dst) => {
    const data = extents.filter((e) => !e.zero).map((e) => ({ start: e.start, end: e.start + e.length }));
    result.skippedBytes = size - data.reduce((s, r) => s + r.end - r.start, 0);
    await copyRanges(endpoint, dst, data, opts, result);
  });
  return result;
}

/**
 * Fills a new local image, written as FILE.partial and renamed to FILE when complete: an
 * interrupted transfer never looks whole, and one that fails (or is interrupted with Ctrl-C)
 * removes its partial file. Only a killed sdmctl leaves one behind; the next run replaces it.
 */
async function intoNewImage(
  file: string,
  format: LocalFormat,
  size: number,
  backing: string | undefined,
  fill: (dst: LocalImage) => Promise<void>,
): Promise<void> {
  const partial = `${file}.partial`;
  try {
    await createImage(partial, format, size, backing);
    const dst = await LocalImage.open(partial, format, { write: true });
    try {
      await fill(dst);
    } finally {
      await dst.close();
    }
  } catch (err) {
    fs.rmSync(partial, { force: true });
    throw err;
  }
  fs.renameSync(partial, file);
}

/**
 * A backup into a qcow2 file. Full: every non-zero extent. Incremental (the transfer was started
 * with a bitmap): only the dirty extents, into a qcow2 whose backing file is the previous backup,
 * so restoring is reading the chain; a dirty range that is zero now is written as zeros locally
 * (it hides the older data of the backing file) without reading it over the wire.
 */
export async function backup(
  endpoint: TransferEndpoint,
  file: string,
  opts: TransferOptions & { incremental?: { backing: string } } = {},
): Promise<TransferResult & { dirtyBytes?: number }> {
  if (!opts.incremental) return download(endpoint, file, 'qcow2', opts);
  const result: TransferResult & { dirtyBytes?: number } = { dataBytes: 0, zeroedBytes: 0, skippedBytes: 0, retried: 0 };
  const { size, dirty } = await endpoint.options();
  if (!dirty) throw new Error('the transfer has no bitmap: an incremental backup needs one (--bitmap)');
  const [dirtyExtents, zeroExtents] = await Promise.all([endpoint.dirtyExtents(), endpoint.zeroExtents()]);
  const dirtyRanges = dirtyExtents.filter((e) => e.dirty).map((e) => ({ start: e.start, end: e.start + e.length }));
  const zeros = zeroExtents.filter((e) => e.zero).map((e) => ({ start: e.start, end: e.start + e.length }));
  const dirtyBytes = dirtyRanges.reduce((s, r) => s + r.end - r.start, 0);
  result.dirtyBytes = dirtyBytes;
  // qemu-img resolves a relative backing name from the new file's directory.
  const backing = path.relative(path.dirname(path.resolve(file)), path.resolve(opts.incremental.backing));
  await intoNewImage(file, 'qcow2', size, backing, async (dst) => {
    const toRead: Range[] = [];
    for (const r of dirtyRanges) {
      for (const z of intersect(r, zeros)) {
        await dst.nbd.writeZeroes(z.start, z.end - z.start);
        result.zeroedBytes += z.end - z.start;
      }
      toRead.push(...subtract(r, zeros));
    }
    result.skippedBytes = size - dirtyBytes;
    await copyRanges(endpoint, dst, toRead, opts, result);
  });
  return result;
}
