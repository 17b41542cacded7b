/**
 * Volume jobs: in-place changes of one volume, run by a copy worker process under the volume's
 * exclusive lease (docs/data-mover.md, "Volume jobs"), in the manner of vdsm's SDM jobs
 * (sdm/api/{sparsify_volume,amend_volume,add_bitmap,remove_bitmap,clear_bitmaps}.py):
 *
 *   lease (exclusive, not waited for) → re-read the record: generation as expected, checks below
 *   → extend:   record ILLEGAL (same generation) → qemu-img resize → fsync → record LEGAL with the
 *               new CAPACITY and generation + 1 in one atomic write (an error in between puts the
 *               file back to the record's capacity and the record LEGAL: storage as before)
 *   → sparsify: qemu-img map of the volume's own layer → read its data, find whole zeroed blocks
 *               (qcow2: clusters; raw: 4 KiB) → qemu-io `write -z -u` on them (holes / zero
 *               clusters) → fsync → generation + 1. No ILLEGAL: the content is the same at every
 *               moment (vdsm's VolumeInfo jobs do not mark ILLEGAL either)
 *   → amend:    qemu-img amend -o compat=… → fsync → generation + 1
 *   → bitmaps:  qemu-img bitmap --add/--remove (common's QemuBitmaps) → fsync → generation + 1
 *   → release the lease, report.
 *
 * checkVolumeJob is also what the service runs before it queues a job (nothing written).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import {
  aborted,
  alreadyExists,
  fail,
  failedPrecondition,
  FIRST_CHILD_FD,
  imageSpec,
  invalidArgument,
  parseQcow2Compat,
  QemuBitmaps,
  Reason,
  SdmeshError,
  validateBitmapName,
  validateCapacity,
  validateGranularity,
  type LeaseClaim,
  type VolumeRecord,
} from '@sdmesh/common/worker';
import { dataBytes, qemuImgCommand, qemuImgMap, registrationFds, runQemuImg, type MapExtent } from './qemu';
import { openVolumeChain, resolveVolume, type OpenedChain, type ResolvedVolume } from './volumes';
import type { CopyJobSpec, JobPhase, VolumeOp, WorkerToParent } from './worker-protocol';

/** The only qcow2 compat level a volume may be amended to (an upgrade; a downgrade would rewrite data). */
export const AMEND_COMPAT_LEVELS = ['1.1'] as const;

/** What the copy worker lends a volume job. */
export interface VolumeJobEnv {
  send(msg: WorkerToParent): Promise<void>;
  signal: AbortSignal;
  abortError(): SdmeshError;
  /** The volume's exclusive lease as a claim (not waited for). */
  exclusiveLease(volume: ResolvedVolume): LeaseClaim;
  holdLeases<T>(claims: LeaseClaim[], fn: () => Promise<T>): Promise<T>;
  writeRecord(volume: ResolvedVolume, record: VolumeRecord): Promise<void>;
}

export interface VolumeJobResult {
  generation: number;
  bytesFreed: number;
}

/** A volume op from the gRPC request (INVALID_ARGUMENT for what no volume could satisfy). */
export function volumeOpOf(op: { $case: string; [k: string]: unknown } | undefined): VolumeOp {
  switch (op?.$case) {
    case 'extend':
      return { kind: 'extend', capacityBytes: validateCapacity((op.extend as { capacityBytes: number }).capacityBytes) };
    case 'sparsify':
      return { kind: 'sparsify' };
    case 'amend': {
      const compat = (op.amend as { compat: string }).compat;
      if (!(AMEND_COMPAT_LEVELS as readonly string[]).includes(compat)) {
        throw invalidArgument(`qcow2 compat ${JSON.stringify(String(compat).slice(0, 16))}: only an upgrade to 1.1 is supported`, Reason.INVALID_COMPAT);
      }
      return { kind: 'amend', compat };
    }
    case 'addBitmap': {
      const b = op.addBitmap as { name: string; granularityBytes: number };
      return { kind: 'add-bitmap', name: validateBitmapName(b.name), granularityBytes: validateGranularity(b.granularityBytes) };
    }
    case 'removeBitmap':
      return { kind: 'remove-bitmap', name: validateBitmapName((op.removeBitmap as { name: string }).name) };
    case 'clearBitmaps':
      return { kind: 'clear-bitmaps' };
    default:
      throw invalidArgument('operation is required (extend, sparsify, amend, add_bitmap, remove_bitmap or clear_bitmaps)', Reason.INVALID_ARGUMENT);
  }
}

/**
 * Checks a volume job against the volume as it is now: by the service before it queues the job,
 * and by the worker again under the lease. Nothing is written.
 */
export function checkVolumeJob(v: ResolvedVolume, op: VolumeOp, opts: { generation: number; resumeIllegal: boolean }): void {
  const r = v.record;
  if (r.template) throw failedPrecondition(`volume ${v.volumeId} is a template's: read-only for good`, Reason.DISK_IS_TEMPLATE);
  if (r.generation !== opts.generation) {
    throw failedPrecondition(`volume ${v.volumeId} is at generation ${r.generation}, the request expected ${opts.generation}`, Reason.GENERATION_MISMATCH);
  }
  const resumable = op.kind === 'extend' && opts.resumeIllegal;
  if (r.legality !== 'LEGAL' && !resumable) throw failedPrecondition(`volume ${v.volumeId} is ILLEGAL: refusing to change it`, Reason.VOLUME_ILLEGAL);
  if (op.kind === 'sparsify') {
    const bad = v.ancestors.find((a) => a.legality !== 'LEGAL');
    if (bad) throw failedPrecondition(`ancestor ${bad.volumeId} of volume ${v.volumeId} is ILLEGAL`, Reason.VOLUME_ILLEGAL);
  }
  switch (op.kind) {
    case 'extend':
      if (v.children.length)
        throw failedPrecondition(`volume ${v.volumeId} has snapshots on top (${v.children.join(', ')}): only the leaf grows`, Reason.VOLUME_NOT_LEAF);
      if (op.capacityBytes < r.capacityBytes) {
        throw invalidArgument(
          `capacity ${op.capacityBytes} is smaller than volume ${v.volumeId}'s ${r.capacityBytes}: a volume only grows`,
          Reason.SHRINK_REFUSED,
        );
      }
      return;
    case 'sparsify':
      if (r.allocation === 'PREALLOCATED') throw failedPrecondition(`volume ${v.volumeId} is preallocated: it keeps its space`, Reason.VOLUME_PREALLOCATED);
      return;
    default:
      if (r.format !== 'QCOW2') throw failedPrecondition(`volume ${v.volumeId} is raw: ${op.kind} needs qcow2`, Reason.NOT_QCOW2);
  }
}

/**
 * Testing only: SDMESH_WORKER_FAULT_FILE names a file; when it holds "<point> kill" the worker
 * SIGKILLs itself at that point, "<point> kill-service" SIGKILLs its data-mover (the kernel then
 * kills the worker: pdeathsig), "<point> pause" writes "<file>.reached" with its pid and waits to be
 * killed. The file is removed when it fires, so a retry runs through.
 */
export function faultPoint(point: string): Promise<void> {
  const file = process.env.SDMESH_WORKER_FAULT_FILE;
  if (!file) return Promise.resolve();
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8').trim();
  } catch {
    return Promise.resolve();
  }
  const [name, action] = text.split(/\s+/);
  if (name !== point) return Promise.resolve();
  fs.rmSync(file, { force: true });
  if (action === 'pause') {
    fs.writeFileSync(`${file}.reached`, String(process.pid));
    return new Promise(() => undefined);
  }
  if (action === 'kill-service') process.kill(process.ppid, 'SIGKILL');
  process.kill(process.pid, 'SIGKILL');
  return new Promise(() => undefined);
}

/** Runs one volume job (the worker's `start` for a spec with volumeOp). */
export async function runVolumeJob(job: CopyJobSpec, env: VolumeJobEnv): Promise<VolumeJobResult> {
  const op = job.volumeOp!;
  const opts = { generation: job.destinationGeneration, resumeIllegal: !!job.resumeIllegal };
  const phase = (p: JobPhase) => env.send({ type: 'phase', phase: p });
  checkVolumeJob(await resolveVolume('volume', job.destination), op, opts);
  if (env.signal.aborted) throw env.abortError();
  await phase('acquiring-leases');
  const pre = await resolveVolume('volume', job.destination);
  return env.holdLeases([env.exclusiveLease(pre)], async () => {
    // Under the lease: what we read now is what counts.
    const v = await resolveVolume('volume', job.destination);
    checkVolumeJob(v, op, opts);
    if (env.signal.aborted) throw env.abortError();
    const ctx: OpContext = { job, env, v, phase };
    switch (op.kind) {
      case 'extend':
        return extend(ctx, op.capacityBytes);
      case 'sparsify':
        return sparsify(ctx);
      case 'amend':
        return amend(ctx, op.compat);
      default:
        return changeBitmaps(ctx, op);
    }
  });
}

interface OpContext {
  job: CopyJobSpec;
  env: VolumeJobEnv;
  v: ResolvedVolume;
  phase(p: JobPhase): Promise<void>;
}

/**
 * Writes the record LEGAL with `patch` and generation + 1, unless a fence moved the generation
 * while the job ran (then the change is not ours to commit: GENERATION_MISMATCH).
 */
async function commit(ctx: OpContext, patch: Partial<VolumeRecord> = {}): Promise<number> {
  await ctx.phase('committing');
  await faultPoint(`${ctx.job.volumeOp!.kind}.before-commit`);
  const now = await resolveVolume('volume', ctx.job.destination);
  if (now.record.generation !== ctx.job.destinationGeneration) {
    throw failedPrecondition(
      `volume ${now.volumeId} moved to generation ${now.record.generation} while this job ran (it expected ${ctx.job.destinationGeneration}): the job was fenced`,
      Reason.GENERATION_MISMATCH,
    );
  }
  const generation = now.record.generation + 1;
  await ctx.env.writeRecord(now, { ...now.record, legality: 'LEGAL', ...patch, generation });
  return generation;
}

/** `qemu-img info` of an opened chain's top layer (no backing opened). */
async function topInfo(v: ResolvedVolume, handle: FileHandle, signal: AbortSignal): Promise<Record<string, unknown>> {
  const spec = imageSpec([{ fd: FIRST_CHILD_FD, format: v.record.format }]);
  const { stdout } = await runQemuImg(['info', '-U', '--output=json', '-f', v.record.format.toLowerCase(), spec], { signal, files: [handle] });
  return JSON.parse(stdout) as Record<string, unknown>;
}

async function withTop<T>(v: ResolvedVolume, fn: (top: OpenedChain) => Promise<T>): Promise<T> {
  const top = await openVolumeChain(v, { write: true, topOnly: true });
  try {
    return await fn(top);
  } finally {
    await top.close();
  }
}

// ---------------------------------------------------------------- extend

/**
 * Grows the volume to `capacity`. Safe against a crash anywhere: the record says ILLEGAL from
 * before the first byte changes until the one write that says LEGAL + new CAPACITY, so readers
 * refuse the volume in between and a retry (the same capacity, resumeIllegal) finishes it — the
 * resize is idempotent, and a file left larger than the record by an earlier, bigger attempt is cut
 * back (its tail was never guest-visible: the record never said so).
 */
async function extend(ctx: OpContext, capacity: number): Promise<VolumeJobResult> {
  const { v, env } = ctx;
  if (v.record.legality === 'LEGAL') {
    await env.writeRecord(v, { ...v.record, legality: 'ILLEGAL' });
    await env.send({ type: 'marked-illegal' });
  }
  await faultPoint('extend.after-illegal');
  await ctx.phase('resizing');
  try {
    await resizeTo(v, capacity, env.signal);
  } catch (err) {
    await restoreAfterFailedExtend(ctx).catch(() => undefined);
    throw err;
  }
  await env.send({ type: 'progress', percent: 100, dataBytes: 0, totalBytes: capacity });
  await faultPoint('extend.after-resize');
  return { generation: await commit(ctx, { capacityBytes: capacity }), bytesFreed: 0 };
}

/** qemu-img resize of the volume's own file to `capacity` (shrinking only an uncommitted tail), then fsync. */
async function resizeTo(v: ResolvedVolume, capacity: number, signal: AbortSignal): Promise<void> {
  await withTop(v, async (top) => {
    const handle = top.handles[0]!;
    const current = Number((await topInfo(v, handle, signal))['virtual-size']);
    if (current !== capacity) {
      const fmt = v.record.format.toLowerCase();
      const args = ['resize', '-q', '-f', fmt];
      if (current > capacity) args.push('--shrink');
      else if (v.record.allocation === 'PREALLOCATED') args.push('--preallocation=falloc');
      await runQemuImg([...args, top.spec(FIRST_CHILD_FD), String(capacity)], { signal, files: [handle] });
    }
    await handle.sync();
  });
}

/** After a failed resize: the file back at the record's capacity, the record LEGAL again (generation + 1). */
async function restoreAfterFailedExtend(ctx: OpContext): Promise<void> {
  const now = await resolveVolume('volume', ctx.job.destination);
  if (now.record.generation !== ctx.job.destinationGeneration) return;
  await resizeTo(now, now.record.capacityBytes, new AbortController().signal);
  await ctx.env.writeRecord(now, { ...now.record, legality: 'LEGAL', generation: now.record.generation + 1 });
}

// ---------------------------------------------------------------- sparsify

/** A guest range that reads as zeros while its blocks are allocated in this layer. */
interface ZeroRun {
  start: number;
  length: number;
}

const READ_CHUNK = 4 * 1024 * 1024;

async function sparsify(ctx: OpContext): Promise<VolumeJobResult> {
  const { v, env } = ctx;
  // The whole chain: qemu must know the layer has a backing, or a zeroed cluster of an overlay
  // could become unallocated and show its backing's data through.
  const chain = await openVolumeChain(v, { write: true });
  // The chain's top is O_DIRECT (for qemu-io's writes); the scan reads through a buffered open.
  const scan = await openVolumeChain(v, { topOnly: true }).catch(async (err: unknown) => {
    await chain.close();
    throw err;
  });
  let freed = 0;
  try {
    const top = chain.handles[0]!;
    const block = v.record.format === 'QCOW2' ? Number((await topInfo(v, top, env.signal))['cluster-size']) || 65536 : 4096;
    await ctx.phase('scanning');
    // The layer's own data extents, read as qemu-img prints them (never held together: a fragmented
    // layer has millions); a first pass only counts their bytes, the progress reports' total.
    const ownData = async function* () {
      for await (const e of qemuImgMap(chain.spec(FIRST_CHILD_FD), v.record.format, chain.handles, env.signal)) {
        if (e.depth === 0 && e.data && !e.zero && e.offset !== undefined) yield e;
      }
    };
    const total = await dataBytes(ownData(), 0);
    const runs = await zeroRuns(scan.handles[0]!, ownData(), total, block, (done, total) =>
      env.send({ type: 'progress', percent: total ? (done / total) * 50 : 50, dataBytes: total, totalBytes: v.record.capacityBytes }),
    );
    await faultPoint('sparsify.after-scan');
    await ctx.phase('sparsifying');
    // In two or more batches (one qemu-io each), so a crash can land between them.
    const batches = batchesOf(runs, Math.max(1, Math.min(256, Math.ceil(runs.length / 2))));
    for (const [i, batch] of batches.entries()) {
      if (env.signal.aborted) throw env.abortError();
      await writeZeroes(chain, v.record.format, batch, env.signal);
      freed += batch.reduce((s, r) => s + r.length, 0);
      await env.send({ type: 'progress', percent: 50 + ((i + 1) / batches.length) * 50, dataBytes: freed, totalBytes: v.record.capacityBytes });
      if (i === 0) await faultPoint('sparsify.after-first-batch');
    }
    await top.sync();
  } finally {
    await scan.close();
    await chain.close();
  }
  return { generation: await commit(ctx), bytesFreed: freed };
}

/**
 * Reads the layer's own data extents (host offsets from qemu-img map) and returns the whole blocks
 * of `block` bytes that hold only zeros, merged into runs (guest offsets).
 */
async function zeroRuns(
  file: FileHandle,
  extents: AsyncIterable<MapExtent>,
  total: number,
  block: number,
  progress: (done: number, total: number) => Promise<void>,
): Promise<ZeroRun[]> {
  const chunkSize = Math.max(block, Math.floor(READ_CHUNK / block) * block);
  const buf = Buffer.alloc(chunkSize);
  const zeros = Buffer.alloc(block);
  const runs: ZeroRun[] = [];
  let done = 0;
  let lastReport = 0;
  for await (const e of extents) {
    // Whole blocks inside the extent only (qcow2 extents are cluster-aligned; raw ones 4 KiB-aligned).
    const first = Math.ceil(e.start / block) * block;
    const end = Math.floor((e.start + e.length) / block) * block;
    for (let pos = first; pos < end; pos += chunkSize) {
      const len = Math.min(chunkSize, end - pos);
      const { bytesRead } = await file.read(buf, 0, len, e.offset! + (pos - e.start));
      for (let i = 0; i + block <= bytesRead; i += block) {
        if (buf.compare(zeros, 0, block, i, i + block) !== 0) continue;
        const start = pos + i;
        const last = runs[runs.length - 1];
        if (last && last.start + last.length === start) last.length += block;
        else runs.push({ start, length: block });
      }
      done += len;
      if (done - lastReport >= 64 * 1024 * 1024) {
        lastReport = done;
        await progress(done, total);
      }
    }
  }
  await progress(total, total);
  return runs;
}

function batchesOf<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/**
 * qemu-io `write -z -u` (zeroes, may unmap) over the runs, on the chain with discard passed down:
 * raw punches holes, qcow2 makes zero clusters and frees their host clusters (holes in the file).
 * Runs like qemu-img: its own process group, SIGKILLed with the worker (pdeathsig).
 */
function writeZeroes(chain: OpenedChain, format: 'RAW' | 'QCOW2', runs: ZeroRun[], signal: AbortSignal): Promise<void> {
  if (runs.length === 0) return Promise.resolve();
  const spec = JSON.parse(chain.spec(FIRST_CHILD_FD).slice('json:'.length)) as { discard?: string; file: { discard?: string } };
  spec.discard = 'unmap';
  spec.file.discard = 'unmap';
  const cmd = qemuImgCommand([]);
  const args = [...cmd.args.slice(0, -1), QEMU_IO, '-f', format.toLowerCase(), `json:${JSON.stringify(spec)}`];
  const child = spawn(cmd.file, args, { cwd: '/', detached: true, stdio: ['pipe', 'pipe', 'pipe', ...chain.handles.map((h) => h.fd), ...registrationFds()] });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out = (out + c).slice(-1_000_000)));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (err = (err + c).slice(-4000)));
  const kill = () => {
    try {
      if (child.pid) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // gone
    }
  };
  signal.addEventListener('abort', kill);
  child.stdin!.end(runs.map((r) => `write -z -u ${r.start} ${r.length}\n`).join(''));
  return new Promise<void>((resolve, reject) => {
    child.on('error', (e) => reject(fail(Reason.QEMU_IMG_FAILED, `cannot run qemu-io: ${e.message}`)));
    child.on('close', (code) => {
      signal.removeEventListener('abort', kill);
      if (signal.aborted) return reject(aborted('sparsify aborted', Reason.ABORTED));
      const wrote = (out.match(/^(?:qemu-io> )*wrote /gm) ?? []).length;
      if (code === 0 && wrote === runs.length) return resolve();
      const detail = (err.trim() || out.trim()).split('\n').slice(-3).join(' ');
      reject(fail(Reason.QEMU_IMG_FAILED, `qemu-io write -z failed (${wrote}/${runs.length} ranges, exit ${code}): ${detail}`));
    });
  });
}

const QEMU_IO = process.env.SDMESH_QEMU_IO ?? 'qemu-io';

// ---------------------------------------------------------------- amend

async function amend(ctx: OpContext, compat: string): Promise<VolumeJobResult> {
  const { v, env } = ctx;
  const changed = await withTop(v, async (top) => {
    const handle = top.handles[0]!;
    if (parseQcow2Compat(await topInfo(v, handle, env.signal)) === compat) return false;
    await ctx.phase('amending');
    await runQemuImg(['amend', '-f', 'qcow2', '-o', `compat=${compat}`, top.spec(FIRST_CHILD_FD)], { signal: env.signal, files: [handle] });
    await handle.sync();
    return true;
  });
  // Nothing to do (already at that level): the volume is left as it was, generation included.
  return { generation: changed ? await commit(ctx) : v.record.generation, bytesFreed: 0 };
}

// ---------------------------------------------------------------- dirty bitmaps

async function changeBitmaps(ctx: OpContext, op: Extract<VolumeOp, { kind: 'add-bitmap' | 'remove-bitmap' | 'clear-bitmaps' }>): Promise<VolumeJobResult> {
  const { v, env } = ctx;
  const cmd = qemuImgCommand([]);
  const bitmaps = new QemuBitmaps({ command: { file: cmd.file, args: cmd.args }, signal: env.signal, inheritFds: registrationFds() });
  await ctx.phase('bitmaps');
  const changed = await withTop(v, async (top) => {
    const handle = top.handles[0]!;
    let did = true;
    if (op.kind === 'add-bitmap') {
      if ((await bitmaps.list(handle)).some((b) => b.name === op.name)) {
        throw alreadyExists(`volume ${v.volumeId} already has a bitmap named ${op.name}`, Reason.BITMAP_EXISTS);
      }
      await bitmaps.add(handle, op.name, { granularity: op.granularityBytes });
    } else if (op.kind === 'remove-bitmap') did = await bitmaps.remove(handle, op.name);
    else did = (await bitmaps.clear(handle)).length > 0;
    if (did) await handle.sync();
    return did;
  });
  return { generation: changed ? await commit(ctx) : v.record.generation, bytesFreed: 0 };
}
