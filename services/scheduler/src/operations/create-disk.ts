import { pb, Reason, validateCapacity, validateDescription } from '@sdmesh/common';
import type { FlowContext } from '../engine';
import { derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { deleteImageOnPlacedHost } from './delete-disk';
import { anyStepStarted, fenceOperation, volumesAfterFence } from './fences';
import { checkEnum, diskLock, diskResource, domainLock, registeredDomain, type OperationKind, type RunEnv } from './operation';
import { onPlacedHost, retryInStep, stepCall } from './placed-steps';

/**
 * Create Disk: one step, `create-volume` (metadata-tx CreateVolume with caller-chosen ids, so a
 * retry returns the committed volume). Disk id = image id, derived from the operation id.
 * Rollback: `rollback:delete-disk` (a create whose answer was lost, or one cancelled or failed
 * after it committed, must not leave the disk listed). Locks: the disk exclusive, its domain shared.
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

  rollback: (env, ctx) => deleteCreatedDisk(env, ctx),
};

/**
 * Deletes the image this operation created, if it did, after fencing the operation in the domain
 * (fences.ts: a create still on its way commits nothing after that): its id is the operation's own, and it
 * holds this operation's volume and nothing else (an image with another volume was not made
 * here: kept). Retried like a copy's rollback while a host is down or its lockspace or a lease
 * refuses (policies placedStep, deleteLeasedTarget); given up, the operation's error says
 * "rollback incomplete" and names the disk.
 */
async function deleteCreatedDisk(env: RunEnv, ctx: FlowContext<CreateDiskParams>): Promise<void> {
  const p = ctx.rec.params;
  const entry = await env.cluster.domains.get(p.domainId);
  await ctx.step('rollback:delete-disk', async (run) => {
    // First the fence: after it no create of this operation can commit, so the read below is final.
    if (anyStepStarted(ctx, (name) => name === 'create-volume')) await fenceOperation(env, ctx, run, entry);
    const volumes = await volumesAfterFence(env, ctx, entry, p.diskId, 'creation');
    if (volumes.length === 0) return null;
    if (volumes.some((v) => v.id !== p.volumeId)) {
      ctx.log.warn({ disk: p.diskId, volumes: volumes.map((v) => v.id) }, 'the disk holds volumes this creation did not make: kept');
      return null;
    }
    return retryInStep(
      ctx,
      env.policies.deleteLeasedTarget,
      () => deleteImageOnPlacedHost(env, ctx, run, entry, p.diskId),
      `delete disk ${p.diskId} (rollback of its creation)`,
    );
  });
}
