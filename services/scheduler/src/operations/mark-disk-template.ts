import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import { checkUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { diskLock, diskResource, domainLock, registeredDomain, type OperationKind } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';
import { templateOf } from './templates';

/**
 * Mark Disk Template: one step, `mark-template` (metadata-tx MarkTemplate: under the domain
 * lease and the volume's lease, the record gets TEMPLATE=1). Only a LEGAL disk of one base
 * volume can become a template (oVirt's templates are one volume too: collapse a chain with a
 * copy first); it is read-only for good. Marking a template again is a no-op.
 * Locks: the disk exclusive, its domain shared.
 */
export interface MarkDiskTemplateParams {
  domainId: string;
  diskId: string;
}

/** Checks a disk can become a template (metadata-tx checks again under its leases). */
export function checkTemplateCandidate(diskId: string, vols: readonly pb.Volume[]): void {
  if (templateOf(vols)) throw failedPrecondition(`disk ${diskId} is a thin clone of disk ${templateOf(vols)}: it can't be a template`, Reason.DISK_IS_CLONE);
  if (vols.length !== 1) {
    throw failedPrecondition(
      `disk ${diskId} has ${vols.length} volumes; a template is one volume (copy the disk with collapse, then mark the copy)`,
      Reason.TEMPLATE_NOT_SINGLE_VOLUME,
    );
  }
  if (vols[0]!.legality !== pb.Legality.LEGALITY_LEGAL) throw failedPrecondition(`disk ${diskId} has an ILLEGAL volume`, Reason.DISK_ILLEGAL);
}

export const markDiskTemplate: OperationKind<pb.MarkDiskTemplateRequest, MarkDiskTemplateParams> = {
  type: pb.OperationType.OPERATION_TYPE_MARK_DISK_TEMPLATE,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const entry = await registeredDomain(env, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    checkTemplateCandidate(diskId, await env.cluster.volumes(entry, diskId, env.call));
    return {
      params: { domainId: entry.id, diskId },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    await ctx.step('mark-template', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'mark_template', domainIds: [entry.id] }, async (h) => {
        await h.clients.metadata.markTemplate(
          { domainPath: entry.path, imageId: p.diskId, operationId: ctx.id },
          stepCall(ctx, CALL_TIMEOUT_MS.bumpGeneration),
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId) };
  },
};
