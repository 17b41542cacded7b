import { pb, Reason, validateCapacity, validateDescription } from '@sdmesh/common';
import { derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { checkEnum, diskLock, diskResource, domainLock, registeredDomain, type OperationKind } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';

/**
 * Create Disk: one step, `create-volume` (metadata-tx CreateVolume with caller-chosen ids, so a
 * retry returns the committed volume). Disk id = image id, derived from the operation id.
 * Locks: the disk exclusive, its domain shared.
 */
export interface CreateDiskParams {
  domainId: string;
  diskId: string;
  volumeId: string;
  capacityBytes: number;
  format: pb.VolumeFormat;
  allocation: pb.VolumeAllocation;
  description: string;
}

export const createDisk: OperationKind<pb.CreateDiskRequest, CreateDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_CREATE_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req, operationId) {
    const entry = await registeredDomain(env, req.storageDomainId);
    validateCapacity(req.capacityBytes);
    checkEnum('format', req.format, pb.VolumeFormat, Reason.INVALID_FORMAT);
    checkEnum('allocation', req.allocation, pb.VolumeAllocation, Reason.INVALID_ALLOCATION);
    const description = validateDescription(req.description);
    const format = req.format || pb.VolumeFormat.VOLUME_FORMAT_RAW;
    const allocation = req.allocation || pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE;
    await env.cluster.checkSpaceForAllocation(entry, allocation === pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED ? req.capacityBytes : 0, env.call);
    const diskId = derivedUuid(operationId, 'disk');
    return {
      params: { domainId: entry.id, diskId, volumeId: derivedUuid(operationId, 'volume'), capacityBytes: req.capacityBytes, format, allocation, description },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    await ctx.step('create-volume', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'create_volume', domainIds: [entry.id] }, async (h) => {
        await h.clients.metadata.createVolume(
          {
            domainPath: entry.path,
            imageId: p.diskId,
            volumeId: p.volumeId,
            format: p.format,
            allocation: p.allocation,
            capacityBytes: p.capacityBytes,
            description: p.description,
            operationId: ctx.id,
          },
          stepCall(ctx, CALL_TIMEOUT_MS.createVolume),
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId) };
  },
};
