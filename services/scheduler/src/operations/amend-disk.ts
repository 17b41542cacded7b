import { failedPrecondition, invalidArgument, pb, Reason } from '@sdmesh/common';
import type { OperationKind } from './operation';
import { changeableDisk, inPlaceDiskLocks, runDiskVolumeJobs } from './volume-jobs';

/** The qcow2 compat levels AmendDisk reaches (an upgrade only). */
export const AMEND_COMPAT = ['1.1'];

/**
 * Amend Disk: upgrades every qcow2 volume of the disk to a qcow2 compat level (0.10 → 1.1: zero
 * clusters, dirty bitmaps), base first, like oVirt's amend of each volume of an image. Steps
 * `amend:<vol>`, data-mover volume jobs under the volume's exclusive lease (qemu-img amend rewrites
 * the header; a volume already at that level is left as it is). Refused: another compat
 * (INVALID_ARGUMENT INVALID_COMPAT), a disk without qcow2 volumes (FAILED_PRECONDITION NOT_QCOW2).
 * Locks: the disk exclusive, its domain shared.
 */
export interface AmendDiskParams {
  domainId: string;
  diskId: string;
  compat: string;
  volumeIds: string[];
}

export const amendDisk: OperationKind<pb.AmendDiskRequest, AmendDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_AMEND_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    if (!AMEND_COMPAT.includes(req.qcow2Compat)) {
      throw invalidArgument(`qcow2_compat ${JSON.stringify(req.qcow2Compat.slice(0, 16))}: only an upgrade to 1.1 is supported`, Reason.INVALID_COMPAT);
    }
    const { entry, diskId, volumes } = await changeableDisk(env, req);
    const qcow2 = volumes.filter((v) => v.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2);
    if (qcow2.length === 0) throw failedPrecondition(`disk ${diskId} has no qcow2 volume to amend`, Reason.NOT_QCOW2);
    return {
      params: { domainId: entry.id, diskId, compat: req.qcow2Compat, volumeIds: qcow2.map((v) => v.id) },
      ...inPlaceDiskLocks(entry.id, diskId),
    };
  },

  run(env, ctx) {
    const p = ctx.rec.params;
    return runDiskVolumeJobs(
      env,
      ctx,
      p,
      p.volumeIds.map((id) => ({ name: `amend:${id}`, volumeId: id, operation: { $case: 'amend', amend: { compat: p.compat } } })),
    );
  },
};
