import { failedPrecondition, invalidArgument, pb, Reason, resourceExhausted, validateCapacity } from '@sdmesh/common';
import { toDisk } from '../cluster';
import type { OperationKind } from './operation';
import { changeableDisk, inPlaceDiskLocks, runVolumeJobs } from './volume-jobs';

/**
 * Extend Disk (grow only): the leaf volume gets the new capacity — raw: the file's size, qcow2:
 * qemu-img resize — and its record the new CAPACITY; earlier volumes keep theirs (qemu reads past a
 * shorter backing file as zeros, so the chain keeps working and the tail reads as zeros).
 * One step, `extend:<leaf>`: a data-mover volume job under the leaf's exclusive lease that marks the
 * record ILLEGAL, resizes, then writes LEGAL + CAPACITY + generation+1 in one atomic record write
 * (volume-job.ts in the data-mover has the crash argument). A killed job is fenced (generation bump)
 * and run again with resume_illegal: the resize is idempotent, so it finishes.
 * Rollback (a cancel, or a job that failed for good after marking the leaf ILLEGAL):
 * `rollback:restore:<leaf>`, the same job with the old capacity, which puts the file back (its tail
 * was never guest-visible) and the record LEGAL: storage as before.
 * Refused: shrink (INVALID_ARGUMENT SHRINK_REFUSED), a preallocated leaf whose growth does not fit
 * in the free space above the critical reserve, or a domain already below it (RESOURCE_EXHAUSTED
 * INSUFFICIENT_SPACE), an ILLEGAL or template disk. Locks: the disk exclusive, its domain shared.
 */
export interface ExtendDiskParams {
  domainId: string;
  diskId: string;
  leafId: string;
  oldCapacityBytes: number;
  capacityBytes: number;
}

export const extendDisk: OperationKind<pb.ExtendDiskRequest, ExtendDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_EXTEND_DISK,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const capacityBytes = validateCapacity(req.capacityBytes);
    const { entry, diskId, volumes } = await changeableDisk(env, req);
    const leaf = volumes[volumes.length - 1]!;
    if (capacityBytes < leaf.capacityBytes) {
      throw invalidArgument(`disk ${diskId} has ${leaf.capacityBytes} bytes; ExtendDisk only grows it (asked: ${capacityBytes})`, Reason.SHRINK_REFUSED);
    }
    await env.cluster.checkSpaceForAllocation(entry, 0, env.call);
    if (leaf.allocation === pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED) {
      const sd = await env.cluster.domainInfo(entry, env.call);
      const growth = capacityBytes - leaf.capacityBytes;
      if (growth > sd.freeBytes - entry.criticalFreeBytes) {
        throw resourceExhausted(
          `preallocating ${growth} more bytes would leave storage domain ${entry.id} below its reserve (free ${sd.freeBytes}, reserve ${entry.criticalFreeBytes})`,
          Reason.INSUFFICIENT_SPACE,
        );
      }
    }
    return {
      params: { domainId: entry.id, diskId, leafId: leaf.id, oldCapacityBytes: leaf.capacityBytes, capacityBytes },
      ...inPlaceDiskLocks(entry.id, diskId),
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    if (p.capacityBytes !== p.oldCapacityBytes) {
      await runVolumeJobs(env, ctx, entry, p.diskId, [
        // resume_illegal: prepare saw the whole disk LEGAL and the disk lock has been ours since, so an ILLEGAL leaf is our own earlier attempt.
        { name: `extend:${p.leafId}`, volumeId: p.leafId, operation: { $case: 'extend', extend: { capacityBytes: p.capacityBytes } }, resumeIllegal: true },
      ]);
    }
    const volumes = await env.cluster.volumes(entry, p.diskId, { signal: ctx.signal });
    const leaf = volumes[volumes.length - 1]!;
    if (leaf.id !== p.leafId || leaf.capacityBytes !== p.capacityBytes) {
      throw failedPrecondition(`disk ${p.diskId}'s leaf is not ${p.leafId} at ${p.capacityBytes} bytes after the extend`, Reason.FAILED_PRECONDITION);
    }
    return { $case: 'disk', disk: toDisk(entry.id, p.diskId, volumes) };
  },

  async rollback(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    const volumes = await env.cluster.volumes(entry, p.diskId, { signal: ctx.signal });
    const leaf = volumes.find((v) => v.id === p.leafId);
    // Only an interrupted extend leaves the leaf ILLEGAL (its record still has the old capacity).
    if (!leaf || leaf.legality === pb.Legality.LEGALITY_LEGAL) return;
    await runVolumeJobs(env, ctx, entry, p.diskId, [
      {
        name: `rollback:restore:${p.leafId}`,
        volumeId: p.leafId,
        operation: { $case: 'extend', extend: { capacityBytes: leaf.capacityBytes } },
        resumeIllegal: true,
      },
    ]);
  },
};
