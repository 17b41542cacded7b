/**
 * FinalizeMerge: the record half of DeleteSnapshot, once the data-mover's merge job has put the
 * data of volume V into its target T (V's parent after a commit, V's only child after the
 * rebase of a base) and written T LEGAL with a new generation. Under the domain lease and the
 * leases of V, T and V's child:
 *   1. V ILLEGAL (it leaves the chain; vdsm marks the merged-away top so too)  merge.after-top-illegal
 *   2. V's child: its header's backing name (qemu-img rebase -u) → merge.after-rebase, then its
 *      record's PARENT_ID, V's parent (commit; with generation + 1) or none (rebase): the new
 *      chain's commit point → merge.after-reparent
 *   3. V's record and data renamed to their _deleted_ names (the GC removes them)  delete.*
 * Idempotent: a retry after any of these steps goes on from where it stopped; when V is gone
 * and nothing names it as parent, the merge is already finalized.
 */
import path from 'node:path';
import {
  encodeVolumeRecord,
  failedPrecondition,
  FIRST_CHILD_FD,
  imageSpec,
  invalidArgument,
  notFound,
  pb,
  readVolumeRecord,
  Reason,
  runQemuImgWithFds,
  TX_INFIX,
  validateDomainPath,
  validateId,
  volumeMetaName,
  type VolumeRecord,
} from '@sdmesh/common';
import type { OpenDomain, TransactionCore, TransactionKind } from './core';
import { commitVolumeDeletion } from './delete-volume';

interface FinalizeMergeParams {
  root: string;
  imageId: string;
  volumeId: string;
  targetId: string;
  targetGeneration: number;
  operationId: string;
}

function finalizeMergeParams(req: pb.FinalizeMergeRequest): FinalizeMergeParams {
  const volumeId = validateId('volume id', req.volumeId);
  const targetId = validateId('target id', req.targetId);
  if (volumeId === targetId) throw invalidArgument('a volume is not merged into itself', Reason.SAME_VOLUME);
  if (!Number.isSafeInteger(req.targetGeneration) || req.targetGeneration < 0) {
    throw invalidArgument(`target_generation ${req.targetGeneration} must be a whole number ≥ 0`, Reason.INVALID_GENERATION);
  }
  return {
    root: validateDomainPath(req.domainPath),
    imageId: validateId('image id', req.imageId),
    volumeId,
    targetId,
    targetGeneration: req.targetGeneration,
    operationId: req.operationId,
  };
}

async function finalizeMerge(tx: TransactionCore, p: FinalizeMergeParams, signal?: AbortSignal): Promise<pb.FinalizeMergeResponse> {
  const { imageId, volumeId, targetId, operationId } = p;
  const domain = await tx.openDomain(p.root);
  await tx.underDomainLease(domain, { operationId, signal }, async () => {
    const listing = await tx.readImage(domain, imageId);
    tx.refuseUnreadable(listing, 'cannot finalize a merge in an image with an unreadable record');
    const byId = new Map(listing.records.map((r) => [r.volumeId, r]));
    const target = byId.get(targetId);
    if (!target) throw notFound(`target volume ${targetId} is not in image ${imageId}`, Reason.VOLUME_NOT_FOUND);
    const merged = byId.get(volumeId);
    if (!merged) {
      // Finalized before (a retry), unless something still names the volume as its parent.
      const orphan = listing.records.find((r) => r.parentId === volumeId);
      if (orphan) throw failedPrecondition(`volume ${orphan.volumeId} names the missing volume ${volumeId} as its parent`, Reason.BROKEN_CHAIN);
      return;
    }
    const plan = mergeShape(merged, target, listing.records);
    if (target.legality !== 'LEGAL' || target.generation !== p.targetGeneration) {
      throw failedPrecondition(
        `target volume ${targetId} is ${target.legality} at generation ${target.generation}, the merge left it LEGAL at ${p.targetGeneration}: run the data merge first`,
        Reason.MERGE_INCOMPLETE,
      );
    }
    const leased = [merged, target, ...(plan.child && plan.child !== target ? [plan.child] : [])];
    await tx.underVolumeLeases(domain, leased, { operationId, signal }, async () => {
      if (merged.legality !== 'ILLEGAL') await writeRecord(tx, domain, { ...merged, legality: 'ILLEGAL' });
      tx.fault('merge.after-top-illegal');
      if (plan.child) {
        await rebaseHeader(tx, domain, plan.child, plan.newParent, signal);
        tx.fault('merge.after-rebase');
        if (plan.child.parentId !== (plan.newParent?.volumeId ?? '')) {
          // Its header changed: a new generation (the target's was moved by the merge job already).
          const generation = plan.child.generation + (plan.child === target ? 0 : 1);
          await writeRecord(tx, domain, { ...plan.child, parentId: plan.newParent?.volumeId ?? '', generation });
        }
        tx.fault('merge.after-reparent');
      }
      await commitVolumeDeletion(tx, domain, listing, { imageId, volumeId });
    });
    const domainId = domain.md.domainId;
    if (plan.child) {
      const child = await tx.toVolume(domain, await readRecord(domain, plan.child));
      tx.publish({ $case: 'volume', volume: { kind: pb.VolumeEvent_Kind.KIND_UPDATED, volume: child, domainId, imageId, operationId } });
    }
    const gone = await tx.toVolume(domain, merged, false);
    tx.publish({ $case: 'volume', volume: { kind: pb.VolumeEvent_Kind.KIND_DELETED, volume: gone, domainId, imageId, operationId } });
    tx.opts.log?.info({ domainId, imageId, volumeId, targetId, child: plan.child?.volumeId }, 'merge finalized: volume left the chain');
  });
  return {};
}

/** Who moves where: the child of the merged-away volume and its new parent (none when a base was merged into its child). */
function mergeShape(merged: VolumeRecord, target: VolumeRecord, records: VolumeRecord[]): { child?: VolumeRecord; newParent?: VolumeRecord } {
  const children = records.filter((r) => r.parentId === merged.volumeId);
  if (children.length > 1) throw failedPrecondition(`volume ${merged.volumeId} has ${children.length} children`, Reason.MERGE_NOT_NEIGHBOURS);
  if (merged.parentId !== '' && merged.parentId === target.volumeId) return { child: children[0], newParent: target };
  if (merged.parentId === '' && children[0]?.volumeId === target.volumeId) return { child: target };
  throw failedPrecondition(
    `volume ${target.volumeId} is neither the parent of volume ${merged.volumeId} nor (that one being a base) its only child`,
    Reason.MERGE_NOT_NEIGHBOURS,
  );
}

const metaPathOf = (domain: OpenDomain, r: VolumeRecord) => path.join(domain.layout.imageDir(r.imageId), volumeMetaName(r.volumeId));

const readRecord = (domain: OpenDomain, r: VolumeRecord): Promise<VolumeRecord> =>
  readVolumeRecord(metaPathOf(domain, r), { volumeId: r.volumeId, imageId: r.imageId, domainId: r.domainId }, domain.dom);

async function writeRecord(tx: TransactionCore, domain: OpenDomain, r: VolumeRecord): Promise<void> {
  await domain.dom.writeFileAtomic(metaPathOf(domain, r), encodeVolumeRecord(r), { tempSuffix: TX_INFIX + tx.newTxId() });
}

/**
 * The child's header names its new backing (relative, as snapshots are created) or none:
 * `qemu-img rebase -u` writes only the header, through the opened file. sdmesh's readers take
 * the chain from the records; the header is for anyone opening the file without them.
 */
async function rebaseHeader(
  tx: TransactionCore,
  domain: OpenDomain,
  child: VolumeRecord,
  newParent: VolumeRecord | undefined,
  signal?: AbortSignal,
): Promise<void> {
  const handle = await domain.dom.openFile(path.join(domain.layout.imageDir(child.imageId), child.volumeId), {
    kind: 'volume',
    write: true,
    notFoundReason: Reason.VOLUME_DATA_MISSING,
  });
  try {
    const backing = newParent ? ['-b', newParent.volumeId, '-F', newParent.format.toLowerCase()] : ['-b', ''];
    const command = tx.opts.qemuImgBinary ? { file: tx.opts.qemuImgBinary, args: [] } : undefined;
    await runQemuImgWithFds(['rebase', '-q', '-u', '-f', 'qcow2', ...backing, imageSpec([{ fd: FIRST_CHILD_FD, format: 'QCOW2' }])], {
      files: [handle],
      signal,
      command,
    });
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export const finalizeMergeTransaction: TransactionKind<pb.FinalizeMergeRequest, FinalizeMergeParams, pb.FinalizeMergeResponse> = {
  op: 'finalize_merge',
  params: finalizeMergeParams,
  run: finalizeMerge,
};
