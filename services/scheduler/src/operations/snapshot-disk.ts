import { failedPrecondition, pb, Reason, validateDescription } from '@sdmesh/common';
import { checkUuid, derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { diskLock, diskResource, domainLock, registeredDomain, type OperationKind } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';
import { refuseTemplate } from './templates';

/**
 * Snapshot Disk: `inspect-disk` (the leaf) → `create-snapshot` (a qcow2 volume on top of it).
 * Refused while the disk has an ILLEGAL volume or its domain is below its critical free space.
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
};
