import { createHash, type Hash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { aborted, failedPrecondition } from '@sdmesh/common';
import { qemuImgChain, qemuImgMap, runQemuImg, type MapExtent } from './qemu';
import { resolveVolume, type ResolvedVolume } from './volumes';
import type { pb } from '@sdmesh/common';

const CHUNK = 4 * 1024 * 1024;
const ZEROS = Buffer.alloc(CHUNK);

export interface VolumeChecksum {
  algorithm: 'sha256';
  checksum: string;
  bytes: number;
  /** How the content was read: straight from the image files, or through a temporary raw copy. */
  method: 'map' | 'raw-copy';
}

const chainState = (v: ResolvedVolume) => [v.record, ...v.ancestors].map((r) => `${r.volumeId}:${r.legality}:${r.generation}`).join(',');

/**
 * sha256 of a volume's guest-visible content: its virtual size in bytes, as a guest reads it
 * through the whole chain — so a raw volume and a qcow2 copy of it hash alike.
 *
 * No lease is taken (sanlock allows one holder of a resource per host, and a checksum must not
 * block or be blocked by a copy on this host). Instead the read is validated optimistically:
 * the volume and its ancestors must be LEGAL before, and their records unchanged after. A copy
 * onto the volume marks it ILLEGAL before writing and bumps the generation when it ends, so
 * any data-mover write during the read is detected (ABORTED VOLUME_CHANGED). Writes by a VM
 * that has the volume open are the caller's business, as for any read of a live disk.
 */
export async function checksumVolume(ref: pb.VolumeRef | undefined, signal?: AbortSignal): Promise<VolumeChecksum> {
  const before = await resolveVolume('volume', ref);
  const illegal = [before.record, ...before.ancestors].find((r) => r.legality !== 'LEGAL');
  if (illegal) {
    throw failedPrecondition(`volume ${illegal.volumeId} ${illegal === before.record ? '' : `(an ancestor of ${before.volumeId}) `}is ILLEGAL: its content is not defined`, 'VOLUME_ILLEGAL');
  }
  const result = await hashImage(before.dataPath, before.record.format, signal);
  const after = await resolveVolume('volume', ref);
  if (chainState(after) !== chainState(before)) {
    throw aborted(`volume ${before.volumeId} changed while it was read (${chainState(before)} → ${chainState(after)}); retry`, 'VOLUME_CHANGED');
  }
  return result;
}

/** Hashes an image's guest-visible content (exported for tests and the bench). */
export async function hashImage(file: string, format: string, signal?: AbortSignal): Promise<VolumeChecksum> {
  const direct = await hashByMap(file, format, signal);
  if (direct) return direct;
  // Compressed or encrypted clusters, or an external data file: let qemu-img decode them.
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdmesh-checksum-'));
  try {
    const raw = path.join(dir, 'raw');
    await runQemuImg(['convert', '-U', '-f', format.toLowerCase(), '-O', 'raw', file, raw], { signal });
    const viaRaw = await hashByMap(raw, 'raw', signal);
    if (!viaRaw) throw failedPrecondition(`cannot map the raw copy of ${file}`, 'CHECKSUM_FAILED');
    return { ...viaRaw, method: 'raw-copy' };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Reads the image through `qemu-img map`: zero extents are hashed as zeros without reading,
 * data extents are read from the chain file at the host offset qemu-img reports. Returns
 * undefined when the map cannot be followed (no host offset, encryption, data file, gaps).
 */
async function hashByMap(file: string, format: string, signal?: AbortSignal): Promise<VolumeChecksum | undefined> {
  const chain = await qemuImgChain(file, format, signal);
  const top = chain[0];
  if (!top || chain.some((c) => c.encrypted || c.dataFile)) return undefined;
  const extents = await qemuImgMap(file, format, signal);
  if (!followable(extents, top.virtualSize, chain.length)) return undefined;
  const files = chain.map((c) => path.resolve(path.dirname(file), c.filename));
  const handles = new Map<number, fs.FileHandle>();
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  try {
    for (const e of extents) {
      if (signal?.aborted) throw aborted('checksum cancelled', 'CANCELLED');
      if (e.zero) {
        await hashZeros(hash, e.length);
        continue;
      }
      let handle = handles.get(e.depth);
      if (!handle) {
        handle = await fs.open(files[e.depth]!, 'r');
        handles.set(e.depth, handle);
      }
      for (let done = 0; done < e.length; ) {
        const want = Math.min(CHUNK, e.length - done);
        const { bytesRead } = await handle.read(buf, 0, want, e.offset! + done);
        // Reading past the end of a raw file that is shorter than its virtual size gives zeros.
        if (bytesRead === 0) {
          await hashZeros(hash, e.length - done);
          break;
        }
        hash.update(buf.subarray(0, bytesRead));
        done += bytesRead;
      }
    }
  } finally {
    await Promise.all([...handles.values()].map((h) => h.close()));
  }
  return { algorithm: 'sha256', checksum: hash.digest('hex'), bytes: top.virtualSize, method: 'map' };
}

function followable(extents: MapExtent[], virtualSize: number, chainLength: number): boolean {
  let next = 0;
  for (const e of extents) {
    if (e.start !== next) return false;
    if (!e.zero && !(e.data && e.offset !== undefined && e.depth < chainLength)) return false;
    next += e.length;
  }
  return next === virtualSize;
}

async function hashZeros(hash: Hash, length: number): Promise<void> {
  for (let left = length, n = 0; left > 0; n++) {
    const step = Math.min(CHUNK, left);
    hash.update(ZEROS.subarray(0, step));
    left -= step;
    // Hashing a large hole is CPU only: let the event loop breathe every 64 MiB.
    if (n % 16 === 15) await new Promise((r) => setImmediate(r));
  }
}
