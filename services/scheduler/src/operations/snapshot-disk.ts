import { failedPrecondition, pb, Reason, validateDescription } from '@sdmesh/common';
import type { FlowContext } from '../engine';
import { checkUuid, derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { anyStepStarted, fenceOperation, volumesAfterFence } from './fences';
import { diskLock, diskResource, domainLock, registeredDomain, type OperationKind, type RunEnv } from './operation';
import { ignoreNotFound, onPlacedHost, retryInStep, stepCall } from './placed-steps';
import { refuseTemplate } from './templates';

/**
 * Snapshot Disk: `inspect-disk` (the leaf) → `create-snapshot` (a qcow2 volume on top of it).
 * Refused while the disk has an ILLEGAL volume or its domain is below its critical free space.
 * Rollback: `rollback:delete-snapshot` (a cancelled or failed snapshot leaves no new leaf).
 * Locks: the disk exclusive, its domain shared.
 */
export interface SnapshotDiskParams {
  domainId: string;
  diskId: string;
  volumeId: string;
  description: string;
}

export const snapshotDisk: OperationKind<pb.SnapshotDiskRequest, SnapshotDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_SNAPSHOT_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req, operationId) {
    const entry = await registeredDomain(env, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const description = validateDescription(req.description);
    const vols = await env.cluster.volumes(entry, diskId, env.call);
    refuseTemplate(diskId, vols, 'be snapshotted');
    if (vols.some((v) => v.legality !== pb.Legality.LEGALITY_LEGAL)) throw failedPrecondition(`disk ${diskId} has an ILLEGAL volume`, Reason.DISK_ILLEGAL);
    await env.cluster.checkSpaceForAllocation(entry, 0, env.call);
    return {
      params: { domainId: entry.id, diskId, volumeId: derivedUuid(operationId, 'snapshot-volume'), description },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    const leafId = await ctx.step('inspect-disk', async () => {
      const vols = await env.cluster.volumes(entry, p.diskId, { signal: ctx.signal });
      return vols[vols.length - 1]!.id;
    });
    await ctx.step('create-snapshot', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'create_volume', domainIds: [entry.id] }, async (h) => {
        await h.clients.metadata.createVolume(
          {
            domainPath: entry.path,
            imageId: p.diskId,
            volumeId: p.volumeId,
            parentId: leafId,
            format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
            allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
            description: p.description,
            operationId: ctx.id,
          },
          stepCall(ctx, CALL_TIMEOUT_MS.createSnapshot),
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId) };
  },

  rollback: (env, ctx) => deleteCreatedSnapshot(env, ctx),
};

/**
 * Deletes the volume this snapshot created, if it did (the volume id is the operation's own),
 * after fencing the operation in the domain (fences.ts: a create of it still on its way or past
 * its last cancel check commits nothing after that). The disk is locked for the operation, so
 * nothing was put on top of the new leaf; DeleteVolume renames it away for the GC.
 */
async function deleteCreatedSnapshot(env: RunEnv, ctx: FlowContext<SnapshotDiskParams>): Promise<void> {
  const p = ctx.rec.params;
  if (!anyStepStarted(ctx, (name) => name === 'create-snapshot')) return;
  const entry = await env.cluster.domains.get(p.domainId);
  await ctx.step('rollback:delete-snapshot', async (run) => {
    await fenceOperation(env, ctx, run, entry);
    const volumes = await volumesAfterFence(env, ctx, entry, p.diskId, 'snapshot');
    if (!volumes.some((v) => v.id === p.volumeId)) return null;
    return retryInStep(
      ctx,
      env.policies.deleteLeasedTarget,
      () =>
        onPlacedHost(env, ctx, run, { kind: 'delete_volume', domainIds: [entry.id] }, async (h) => {
          await h.clients.metadata
            .deleteVolume({ domainPath: entry.path, imageId: p.diskId, volumeId: p.volumeId, operationId: ctx.id }, stepCall(ctx, CALL_TIMEOUT_MS.deleteImage))
            .catch(ignoreNotFound);
          return null;
        }),
      `delete snapshot volume ${p.volumeId} of disk ${p.diskId} (rollback)`,
    );
  });
}
