/**
 * The data half of DeleteSnapshot (a cold merge, after vdsm's sdm merge): the data of one volume
 * goes into a neighbour in its chain, which the copy worker has marked ILLEGAL under its
 * exclusive lease (the source is read under a shared one).
 *   - commit: the destination is the source's parent: `qemu-img commit -d` of the source's own
 *     layer into it (the source stays as it was, so a retry commits the same data again), after
 *     the destination has grown to the source's capacity if it was smaller;
 *   - rebase: the source is a base and the destination its child: `qemu-img rebase -b ''` copies
 *     into the child what it read through the base, and drops its backing.
 * Dirty bitmaps follow the data (carryBitmaps). Either way the destination's guest view ends
 * equal to the one the leaf had through the source, and every other volume's view is untouched.
 * The chain's records are changed afterwards by metadata-tx's FinalizeMerge.
 */
import { FIRST_CHILD_FD, imageSpec, failedPrecondition, isValidBitmap, QemuBitmaps, Reason } from '@sdmesh/common/worker';
import type { FileHandle } from 'node:fs/promises';
import { qemuImgCommand, registrationFds, runQemuImg, startQemuImgWithProgress } from './qemu';
import { openVolumeChain, type OpenedChain, type ResolvedVolume } from './volumes';

export interface MergePlan {
  mode: 'commit' | 'rebase';
  source: ResolvedVolume;
  destination: ResolvedVolume;
  /** The destination's capacity once merged (a commit grows a smaller parent to the source's). */
  capacityBytes: number;
}

/**
 * Checks a merge against the volumes as they are now (the service before it queues the job, the
 * worker again under the leases). The destination may be ILLEGAL: an interrupted merge is run
 * again; the source must be LEGAL (a merge that got to its finalize is ended by FinalizeMerge).
 */
export function checkMerge(source: ResolvedVolume, destination: ResolvedVolume, opts: { destinationGeneration: number }): MergePlan {
  const sameImage = source.domain.id === destination.domain.id && source.imageId === destination.imageId;
  const mode =
    sameImage && source.record.parentId !== '' && source.record.parentId === destination.volumeId
      ? 'commit'
      : sameImage && source.record.parentId === '' && destination.record.parentId === source.volumeId
        ? 'rebase'
        : undefined;
  if (!mode) {
    throw failedPrecondition(
      `volume ${destination.volumeId} is neither the parent of volume ${source.volumeId} nor (that one being a base) its child in the same image`,
      Reason.MERGE_NOT_NEIGHBOURS,
    );
  }
  if (mode === 'rebase' && source.children.length !== 1) {
    throw failedPrecondition(
      `base volume ${source.volumeId} has ${source.children.length} children: it merges into an only child`,
      Reason.MERGE_NOT_NEIGHBOURS,
    );
  }
  if (source.record.legality !== 'LEGAL') {
    throw failedPrecondition(`source volume ${source.volumeId} is ILLEGAL: refusing to merge it`, Reason.SOURCE_ILLEGAL);
  }
  if (destination.record.generation !== opts.destinationGeneration) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} is at generation ${destination.record.generation}, the request expected ${opts.destinationGeneration}`,
      Reason.GENERATION_MISMATCH,
    );
  }
  const capacityBytes = Math.max(source.record.capacityBytes, destination.record.capacityBytes);
  return { mode, source, destination, capacityBytes };
}

/** Runs the merge's qemu-img on opened files, reporting percent; the destination is fsynced before it returns. */
export async function mergeData(
  plan: MergePlan,
  opts: { signal: AbortSignal; rateLimitBytesPerSecond: number; onPercent: (percent: number) => void; onStarted?: (pid: number | undefined) => void },
): Promise<void> {
  const { source, destination } = plan;
  const top = plan.mode === 'commit' ? await openVolumeChain(source, { topOnly: true }) : undefined;
  let target: OpenedChain | undefined;
  try {
    // The destination and its ancestors (their data is what a partial cluster write copies on write).
    target = await openVolumeChain(destination, { write: true });
    const files = [...(top?.handles ?? []), ...target.handles];
    const formats = [...(top?.formats ?? []), ...target.formats];
    // The destination (the target's top) is written O_DIRECT; so is a commit's top, which qemu-img
    // opens read-write too (it may touch its header, e.g. a bitmap's in-use flag).
    const destinationIndex = top?.handles.length ?? 0;
    const spec = imageSpec(formats.map((format, i) => ({ fd: FIRST_CHILD_FD + i, format, direct: i <= destinationIndex })));
    let args: string[];
    if (plan.mode === 'commit') {
      if (destination.record.capacityBytes < plan.capacityBytes) await growDestination(plan, target.handles[0]!, opts.signal);
      // -d: the source keeps its data (it is still in the chain until the finalize).
      args = ['commit', '-p', '-d', '-f', 'qcow2'];
      if (opts.rateLimitBytesPerSecond > 0) args.push('-r', String(opts.rateLimitBytesPerSecond));
      args.push(spec);
    } else {
      // A safe rebase onto no backing: what the child read through the base is written into it.
      args = ['rebase', '-p', '-f', 'qcow2', '-b', '', spec];
    }
    const run = startQemuImgWithProgress(args, opts.onPercent, files);
    opts.onStarted?.(run.child.pid);
    const onAbort = () => run.kill(String(opts.signal.reason ?? 'aborted'));
    opts.signal.addEventListener('abort', onAbort);
    try {
      await run.done;
    } finally {
      opts.signal.removeEventListener('abort', onAbort);
    }
    await carryBitmaps(plan, { top: top?.handles[0], target: target.handles }, opts.signal);
    // On stable storage before the record says LEGAL.
    await target.handles[0]!.sync();
  } finally {
    await target?.close();
    await top?.close();
  }
}

/** A parent smaller than the volume committed into it grows first (a raw one stays sparse beyond its old end unless preallocated). */
async function growDestination(plan: MergePlan, handle: FileHandle, signal: AbortSignal): Promise<void> {
  const d = plan.destination.record;
  const args = ['resize', '-f', d.format.toLowerCase()];
  if (d.format === 'RAW' && d.allocation === 'PREALLOCATED') args.push('--preallocation=falloc');
  args.push(imageSpec([{ fd: FIRST_CHILD_FD, format: d.format, direct: true }]), String(plan.capacityBytes));
  await runQemuImg(args, { signal, files: [handle] });
}

/**
 * Dirty bitmaps follow the data (vdsm merges them after a commit): a commit merges the top's valid
 * bitmaps into the parent (added there when missing, unless the parent's own parent has one the
 * parent lacks: a gap no backup may trust); a rebase merges the base's valid bitmaps into the
 * child's bitmaps of the same names (one the child lacks did not track the child's writes, so it is
 * not carried). Raw volumes hold no bitmaps.
 */
async function carryBitmaps(plan: MergePlan, files: { top?: FileHandle; target: FileHandle[] }, signal: AbortSignal): Promise<void> {
  const { source, destination } = plan;
  if (source.record.format !== 'QCOW2' || destination.record.format !== 'QCOW2') return;
  const cmd = qemuImgCommand([]);
  const bitmaps = new QemuBitmaps({ command: { file: cmd.file, args: cmd.args }, signal, inheritFds: registrationFds() });
  const [target, below] = files.target;
  if (plan.mode === 'commit') {
    const parentOfTarget = destination.ancestors[0]?.format === 'QCOW2' ? below : undefined;
    await bitmaps.mergeInto(files.top!, target!, parentOfTarget);
    return;
  }
  const childNames = new Set((await bitmaps.list(target!)).map((b) => b.name));
  for (const b of (await bitmaps.list(below!)).filter(isValidBitmap)) {
    if (childNames.has(b.name)) await bitmaps.merge(below!, b.name, target!, b.name);
  }
}
