import { createHash, type Hash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { aborted, cancelled, failedPrecondition, FIRST_CHILD_FD, imageSpec, Reason } from '@sdmesh/common';
import { qemuImgTopInfo, qemuImgMap, runQemuImg, type MapExtent } from './qemu';
import { openVolumeChain, resolveVolume, type OpenedChain, type ResolvedVolume } from './volumes';
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
    throw failedPrecondition(
      `volume ${illegal.volumeId} ${illegal === before.record ? '' : `(an ancestor of ${before.volumeId}) `}is ILLEGAL: its content is not defined`,
      Reason.VOLUME_ILLEGAL,
    );
  }
  const chain = await openVolumeChain(before);
  let result: VolumeChecksum;
  try {
    result = await hashImage(chain, signal);
  } finally {
    await chain.close();
  }
  const after = await resolveVolume('volume', ref);
  if (chainState(after) !== chainState(before)) {
    throw aborted(`volume ${before.volumeId} changed while it was read (${chainState(before)} → ${chainState(after)}); retry`, Reason.VOLUME_CHANGED);
  }
  return result;
}

/** Opens a plain image file (and its backing files, top first) of this host: for tests and the bench. */
export async function openImageFiles(layers: Array<{ file: string; format: 'RAW' | 'QCOW2' }>): Promise<OpenedChain> {
  const handles = await Promise.all(layers.map((l) => fs.open(l.file, 'r')));
  const formats = layers.map((l) => l.format);
  return {
    handles,
    formats,
    spec: (firstFd) => imageSpec(formats.map((format, i) => ({ fd: firstFd + i, format }))),
    close: async () => {
      await Promise.all(handles.map((h) => h.close()));
    },
  };
}

/** Hashes an opened chain's guest-visible content (exported for tests and the bench). */
export async function hashImage(chain: OpenedChain, signal?: AbortSignal): Promise<VolumeChecksum> {
  const direct = await hashByMap(chain, signal);
  if (direct) return direct;
  // Compressed clusters: let qemu-img decode them into a private raw copy.
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sdmesh-checksum-'));
  try {
    const raw = path.join(dir, 'raw');
    await runQemuImg(['convert', '-U', '-f', chain.formats[0]!.toLowerCase(), '-O', 'raw', chain.spec(FIRST_CHILD_FD), raw], { signal, files: chain.handles });
    const rawChain = await openImageFiles([{ file: raw, format: 'RAW' }]);
    try {
      const viaRaw = await hashByMap(rawChain, signal);
      if (!viaRaw) throw failedPrecondition('cannot map the raw copy of the image', Reason.CHECKSUM_FAILED);
      return { ...viaRaw, method: 'raw-copy' };
    } finally {
      await rawChain.close();
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Reads the image through `qemu-img map`: zero extents are hashed as zeros without reading,
 * data extents are read from the chain file at the host offset qemu-img reports. Returns
 * undefined when the map cannot be followed (no host offset, encryption, data file, gaps).
 * The extents are hashed as qemu-img prints them (a fragmented image has millions): one that
 * cannot be followed stops the map and drops the partial hash.
 */
async function hashByMap(opened: OpenedChain, signal?: AbortSignal): Promise<VolumeChecksum | undefined> {
  const spec = opened.spec(FIRST_CHILD_FD);
  const format = opened.formats[0]!;
  // info does not open backing files: give it the top layer alone (backing: null).
  const top = await qemuImgTopInfo(imageSpec([{ fd: FIRST_CHILD_FD, format }]), format, opened.handles.slice(0, 1), signal);
  if (top.encrypted || top.dataFile) return undefined;
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  let next = 0;
  for await (const e of qemuImgMap(spec, format, opened.handles, signal)) {
    if (!followable(e, next, opened.handles.length) || next + e.length > top.virtualSize) return undefined;
    next += e.length;
    if (signal?.aborted) throw cancelled('checksum cancelled');
    if (e.zero) {
      await hashZeros(hash, e.length);
      continue;
    }
    // Depth d is the d-th layer we opened ourselves: no path from qemu-img's output is opened.
    const handle = opened.handles[e.depth]!;
    for (let done = 0; done < e.length;) {
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
  if (next !== top.virtualSize) return undefined;
  return { algorithm: 'sha256', checksum: hash.digest('hex'), bytes: top.virtualSize, method: 'map' };
}

/** An extent the hash can follow: the next one (no gap), zeros, or data at a host offset in a layer we opened. */
function followable(e: MapExtent, next: number, chainLength: number): boolean {
  return e.start === next && (e.zero || (e.data && e.offset !== undefined && e.depth < chainLength));
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
