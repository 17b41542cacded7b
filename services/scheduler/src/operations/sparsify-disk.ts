import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import type { OperationKind } from './operation';
import { changeableDisk, inPlaceDiskLocks, runDiskVolumeJobs } from './volume-jobs';

/**
 * Sparsify Disk: gives back the space of zeroed data in every sparse volume of the disk, base
 * first — raw: holes punched where whole 4 KiB blocks read as zeros; qcow2: such clusters become
 * zero clusters and their host clusters are freed (compat 1.1; a 0.10 overlay can't have zero
 * clusters and keeps its space). The guest-visible content is the same at every moment, so a
 * volume is not marked ILLEGAL (as in vdsm's sparsify job); each job still runs under the volume's
 * exclusive lease and bumps its generation. Steps `sparsify:<vol>`; a killed job is fenced and run
 * again. Preallocated volumes keep their space (skipped; a disk with only such volumes is refused,
 * FAILED_PRECONDITION VOLUME_PREALLOCATED). Locks: the disk exclusive, its domain shared.
 */
export interface SparsifyDiskParams {
  domainId: string;
  diskId: string;
  volumeIds: string[];
}

export const sparsifyDisk: OperationKind<pb.SparsifyDiskRequest, SparsifyDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_SPARSIFY_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const { entry, diskId, volumes } = await changeableDisk(env, req);
    const sparse = volumes.filter((v) => v.allocation !== pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED);
    if (sparse.length === 0) throw failedPrecondition(`disk ${diskId} is preallocated: it keeps its space`, Reason.VOLUME_PREALLOCATED);
    return {
      params: { domainId: entry.id, diskId, volumeIds: sparse.map((v) => v.id) },
      ...inPlaceDiskLocks(entry.id, diskId),
    };
  },

  run(env, ctx) {
    const p = ctx.rec.params;
    return runDiskVolumeJobs(
      env,
      ctx,
      p,
      p.volumeIds.map((id) => ({ name: `sparsify:${id}`, volumeId: id, operation: { $case: 'sparsify', sparsify: {} } })),
    );
  },
};
