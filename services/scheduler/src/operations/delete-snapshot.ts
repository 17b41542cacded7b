import { failedPrecondition, notFound, pb, Reason } from '@sdmesh/common';
import { checkUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { diskLock, diskResource, domainLock, registeredDomain, type OperationKind } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';
import { refuseTemplate } from './templates';
import { copyVolume } from './volume-copy';

/**
 * Delete Snapshot: one volume V leaves the disk's chain and the leaf's guest view stays as it
 * was (a cold merge, after oVirt's). V's data goes into its target T:
 *   - V has a parent: T is the parent, `qemu-img commit` of V's layer into it (T grows to V's
 *     capacity first when smaller); V's child, if any, is re-parented onto T;
 *   - V is the base: T is its only child, `qemu-img rebase -b ''` of T off V; T becomes the base.
 * Steps: `inspect-chain` → `merge-volume:<V>` (a data-mover merge job under the copy protocol: T
 * ILLEGAL, the data, T LEGAL with generation + 1; host death → fence T and run it again, the
 * merge being idempotent; so is a qemu-img that died under the job) → `finalize-merge` (metadata-tx FinalizeMerge: V ILLEGAL, the child
 * re-parented, V renamed to garbage for the GC). No rollback: before the job marks T ILLEGAL
 * nothing changed; after it the operation only goes forward, and a new DeleteSnapshot of V
 * finishes what a failed one left (the only ILLEGAL volumes it accepts are V and T).
 * Refused: the only volume of a disk (ONLY_VOLUME), a template (DISK_IS_TEMPLATE), a thin
 * clone's base (MERGE_INTO_TEMPLATE), another ILLEGAL volume (DISK_ILLEGAL).
 * Locks: the disk exclusive, its domain shared.
 */
export interface DeleteSnapshotParams {
  domainId: string;
  diskId: string;
  volumeId: string;
}

/** What inspect-chain found (JSON-safe, persisted). */
interface MergeTarget {
  /** V is gone already (a resumed operation whose finalize ended). */
  gone: boolean;
  targetId: string;
  mode: 'commit' | 'rebase';
  capacityBytes: number;
  /** V is ILLEGAL: a finalize began, so T holds the merged data (LEGAL at targetGeneration): only the finalize is left. */
  finalizeOnly: boolean;
  targetGeneration: number;
}

/** The merge of volume V in this chain (base first), or why it is refused. */
function mergeTarget(diskId: string, vols: readonly pb.Volume[], volumeId: string): MergeTarget {
  const v = vols.find((x) => x.id === volumeId);
  if (!v) throw notFound(`volume ${volumeId} is not in disk ${diskId}`, Reason.VOLUME_NOT_FOUND);
  if (vols.length === 1) throw failedPrecondition(`volume ${volumeId} is the only volume of disk ${diskId}: delete the disk instead`, Reason.ONLY_VOLUME);
  if (v.parentImageId) {
    throw failedPrecondition(`volume ${volumeId} is a thin clone's base: its parent is a template's volume, which is read-only`, Reason.MERGE_INTO_TEMPLATE);
  }
  const target = v.parentId ? vols.find((x) => x.id === v.parentId) : vols.find((x) => x.parentId === v.id);
  if (!target) throw failedPrecondition(`volume ${volumeId} of disk ${diskId} has no neighbour to merge into`, Reason.BROKEN_CHAIN);
  const legal = (x: pb.Volume) => x.legality === pb.Legality.LEGALITY_LEGAL;
  // An interrupted merge of this very volume left V or T ILLEGAL: that is what this request finishes.
  const other = vols.find((x) => !legal(x) && x.id !== v.id && x.id !== target.id);
  if (other || (!legal(v) && !legal(target))) {
    throw failedPrecondition(`volume ${(other ?? v).id} of disk ${diskId} is ILLEGAL`, Reason.DISK_ILLEGAL);
  }
  return {
    gone: false,
    targetId: target.id,
    mode: v.parentId ? 'commit' : 'rebase',
    capacityBytes: Math.max(v.capacityBytes, target.capacityBytes),
    finalizeOnly: !legal(v),
    targetGeneration: target.generation,
  };
}

export const deleteSnapshot: OperationKind<pb.DeleteSnapshotRequest, DeleteSnapshotParams> = {
  type: pb.OperationType.OPERATION_TYPE_DELETE_SNAPSHOT,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const entry = await registeredDomain(env, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const volumeId = checkUuid('volume_id', req.volumeId);
    const vols = await env.cluster.volumes(entry, diskId, env.call);
    refuseTemplate(diskId, vols, 'lose a volume');
    mergeTarget(diskId, vols, volumeId);
    // The merge may allocate in the target as much as V holds.
    await env.cluster.checkSpaceForAllocation(entry, 0, env.call);
    return {
      params: { domainId: entry.id, diskId, volumeId },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    const plan = await ctx.step('inspect-chain', async (): Promise<MergeTarget> => {
      const vols = await env.cluster.volumes(entry, p.diskId, { signal: ctx.signal });
      if (!vols.some((v) => v.id === p.volumeId))
        return { gone: true, targetId: '', mode: 'commit', capacityBytes: 0, finalizeOnly: false, targetGeneration: 0 };
      return mergeTarget(p.diskId, vols, p.volumeId);
    });
    if (!plan.gone) {
      const location = (volumeId: string) => ({ domain: entry, imageId: p.diskId, volumeId });
      const targetGeneration = plan.finalizeOnly
        ? plan.targetGeneration
        : (
            await ctx.step(`merge-volume:${p.volumeId}`, (run) =>
              copyVolume(env, ctx, run, {
                source: location(p.volumeId),
                destination: location(plan.targetId),
                collapse: false,
                merge: true,
                overall: (bytes) => ({
                  percent: plan.capacityBytes ? (bytes / plan.capacityBytes) * 100 : 0,
                  bytesDone: bytes,
                  bytesTotal: plan.capacityBytes,
                  mbps: 0,
                }),
              }),
            )
          ).generation;
      await ctx.step('finalize-merge', (run) =>
        onPlacedHost(env, ctx, run, { kind: 'finalize_merge', domainIds: [entry.id] }, async (h) => {
          await h.clients.metadata.finalizeMerge(
            { domainPath: entry.path, imageId: p.diskId, volumeId: p.volumeId, targetId: plan.targetId, targetGeneration, operationId: ctx.id },
            stepCall(ctx, CALL_TIMEOUT_MS.finalizeMerge),
          );
          return null;
        }),
      );
    }
    return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId) };
  },
};
