import { pb, Reason } from '@sdmesh/common';
import type { DomainEntry } from '../domains';
import type { FlowContext, StepRun } from '../engine';
import { checkUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { diskLock, diskResource, domainLock, registeredDomain, type OperationKind, type RunEnv } from './operation';
import { ignoreNotFound, onPlacedHost, stepCall } from './placed-steps';
import { refuseDeletingUsedTemplate } from './templates';

/**
 * Delete Disk: one step, `delete-image` (metadata-tx DeleteImage: one rename; the GC removes
 * the data; an image already gone counts as deleted). Locks: the disk exclusive, its domain shared.
 */
export interface DeleteDiskParams {
  domainId: string;
  diskId: string;
}

/** Deletes an image on a placed host (shared with Move Disk's delete-source); idempotent. */
export function deleteImageOnPlacedHost(env: RunEnv, ctx: FlowContext<unknown>, run: StepRun, domain: DomainEntry, imageId: string): Promise<null> {
  return onPlacedHost(env, ctx, run, { kind: 'delete_image', domainIds: [domain.id] }, async (h) => {
    await h.clients.metadata
      .deleteImage({ domainPath: domain.path, imageId, operationId: ctx.id }, stepCall(ctx, CALL_TIMEOUT_MS.deleteImage))
      .catch(ignoreNotFound);
    return null;
  });
}

export const deleteDisk: OperationKind<pb.DeleteDiskRequest, DeleteDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_DELETE_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const entry = await registeredDomain(env, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    await refuseDeletingUsedTemplate(env.cluster, entry, diskId, await env.cluster.volumes(entry, diskId, env.call), env.call);
    return {
      params: { domainId: entry.id, diskId },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    await ctx.step('delete-image', (run) => deleteImageOnPlacedHost(env, ctx, run, entry, p.diskId));
    return undefined;
  },
};
