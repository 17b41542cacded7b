import { failedPrecondition, invalidArgument, pb, Reason, validateDescription } from '@sdmesh/common';
import { toDisk } from '../cluster';
import { checkUuid, derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { deleteTarget, runCopy, type CopyDiskParams } from './copy-disk';
import { checkEnum, diskLock, diskResource, domainLock, registeredDomain, type OperationKind } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';
import { isTemplate } from './templates';

/**
 * Clone Disk: a new disk from a template.
 * - THIN (default): one step, `create-clone` (metadata-tx CreateVolume with parent_image_id: a
 *   new image whose base is a qcow2 overlay on the template's volume, in the template's domain).
 *   Nothing is copied: the clone reads the template's data through its backing.
 * - FULL: the copy path (copy-disk.ts: create the target, copy the volume with the data-mover),
 *   in the template's domain or another; the result is an ordinary, independent disk.
 * The clone's disk id and volume id derive from the operation id. Rollback deletes the clone.
 * Locks: the template shared (clones of one template run together; the template can't be
 * deleted or marked meanwhile), the new disk exclusive, the domains shared.
 */
export interface CloneDiskParams extends CopyDiskParams {
  mode: pb.CloneMode;
}

export const cloneDisk: OperationKind<pb.CloneDiskRequest, CloneDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_CLONE_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req, operationId) {
    const src = await registeredDomain(env, req.storageDomainId);
    const templateId = checkUuid('template_disk_id', req.templateDiskId, Reason.INVALID_DISK_ID);
    checkEnum('mode', req.mode, pb.CloneMode, Reason.INVALID_CLONE_MODE);
    const mode = req.mode || pb.CloneMode.CLONE_MODE_THIN;
    const dst = req.targetStorageDomainId ? await registeredDomain(env, req.targetStorageDomainId, 'target_storage_domain_id') : src;
    if (mode === pb.CloneMode.CLONE_MODE_THIN && dst.id !== src.id) {
      throw invalidArgument(
        `a thin clone lives in its template's storage domain ${src.id}; make a FULL clone to put it in ${dst.id}`,
        Reason.THIN_CLONE_OTHER_DOMAIN,
      );
    }
    const description = validateDescription(req.description);
    const vols = await env.cluster.volumes(src, templateId, env.call);
    if (!isTemplate(vols)) throw failedPrecondition(`disk ${templateId} is not a template: mark it a template first`, Reason.NOT_A_TEMPLATE);
    if (vols.some((v) => v.legality !== pb.Legality.LEGALITY_LEGAL)) throw failedPrecondition(`template disk ${templateId} is ILLEGAL`, Reason.DISK_ILLEGAL);
    await env.cluster.checkSpaceForAllocation(dst, 0, env.call);
    const targetDiskId = derivedUuid(operationId, 'disk');
    const volumeIds = Object.fromEntries(vols.map((v) => [v.id, derivedUuid(operationId, `volume:${v.id}`)]));
    return {
      params: { mode, domainId: src.id, diskId: templateId, targetDomainId: dst.id, targetDiskId, collapse: false, targetFormat: 0, volumeIds, description },
      locks: [
        diskLock(templateId, 'shared'),
        diskLock(targetDiskId, 'exclusive'),
        domainLock(src.id, 'shared'),
        ...(dst.id === src.id ? [] : [domainLock(dst.id, 'shared')]),
      ],
      targetResources: [diskResource(src.id, templateId), diskResource(dst.id, targetDiskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    if (p.mode === pb.CloneMode.CLONE_MODE_FULL) return runCopy(env, ctx, { move: false });
    const entry = await env.cluster.domains.get(p.domainId);
    const [templateVolumeId, volumeId] = Object.entries(p.volumeIds)[0]!;
    await ctx.step('create-clone', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'create_volume', domainIds: [entry.id] }, async (h) => {
        await h.clients.metadata.createVolume(
          {
            domainPath: entry.path,
            imageId: p.targetDiskId,
            volumeId,
            parentId: templateVolumeId,
            parentImageId: p.diskId,
            format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
            allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
            description: p.description ?? '',
            operationId: ctx.id,
          },
          stepCall(ctx, CALL_TIMEOUT_MS.createSnapshot),
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: toDisk(entry.id, p.targetDiskId, await env.cluster.volumes(entry, p.targetDiskId)) };
  },

  rollback: (env, ctx) => deleteTarget(env, ctx, { move: false }),
};
