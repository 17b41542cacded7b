import { alreadyExists, failedPrecondition, notFound, pb, Reason, validateBitmapName, validateGranularity } from '@sdmesh/common';
import type { OperationKind, PrepareEnv } from './operation';
import { changeableDisk, diskBitmaps, inPlaceDiskLocks, runDiskVolumeJobs, type VolumeJobStep } from './volume-jobs';

/**
 * Dirty bitmaps of a disk (incremental backup), as oVirt keeps them:
 * - AddDiskBitmap: on the leaf (where the writes go); refused when a volume of the disk already has
 *   that name (BITMAP_EXISTS, as vdsm's add_bitmap checks the chain), when the leaf is raw
 *   (NOT_QCOW2) or compat 0.10 (QCOW2_COMPAT_TOO_OLD). A later SnapshotDisk carries the leaf's valid
 *   bitmaps to the new leaf (metadata-tx create-snapshot.ts), so tracking goes on there.
 * - RemoveDiskBitmap: from every volume of the disk that has it (NOT_FOUND BITMAP_NOT_FOUND if none).
 * - ClearDiskBitmaps: every bitmap from every qcow2 volume.
 * Each change is a data-mover volume job (`<kind>:<vol>`) under the volume's exclusive lease with a
 * generation bump. Locks: the disk exclusive, its domain shared.
 */
export interface DiskBitmapParams {
  domainId: string;
  diskId: string;
  steps: VolumeJobStep[];
}

async function prepared(
  env: PrepareEnv,
  req: { storageDomainId: string; diskId: string },
  plan: (vols: pb.VolumeBitmaps[], diskId: string) => VolumeJobStep[],
) {
  const { entry, diskId, volumes } = await changeableDisk(env, req);
  if (!volumes.some((v) => v.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2)) {
    throw failedPrecondition(`disk ${diskId} is raw: dirty bitmaps live in qcow2 volumes (snapshot it first)`, Reason.NOT_QCOW2);
  }
  const steps = plan(await diskBitmaps(env.cluster, entry, diskId, volumes, env.call), diskId);
  return {
    params: { domainId: entry.id, diskId, steps },
    ...inPlaceDiskLocks(entry.id, diskId),
  };
}

function run(env: Parameters<OperationKind<never, DiskBitmapParams>['run']>[0], ctx: Parameters<OperationKind<never, DiskBitmapParams>['run']>[1]) {
  return runDiskVolumeJobs(env, ctx, ctx.rec.params, ctx.rec.params.steps);
}

export const addDiskBitmap: OperationKind<pb.AddDiskBitmapRequest, DiskBitmapParams> = {
  type: pb.OperationType.OPERATION_TYPE_ADD_DISK_BITMAP,
  waitForLocks: (req) => req.waitForLocks,
  prepare(env, req) {
    const name = validateBitmapName(req.bitmap);
    const granularityBytes = validateGranularity(req.granularityBytes);
    return prepared(env, req, (vols, diskId) => {
      const leaf = vols[vols.length - 1]!;
      if (leaf.format !== pb.VolumeFormat.VOLUME_FORMAT_QCOW2) {
        throw failedPrecondition(`the leaf of disk ${diskId} is raw: dirty bitmaps live in qcow2 volumes (snapshot it first)`, Reason.NOT_QCOW2);
      }
      if (leaf.qcow2Compat === '0.10') {
        throw failedPrecondition(`the leaf of disk ${diskId} is qcow2 compat 0.10: amend the disk to 1.1 first`, Reason.QCOW2_COMPAT_TOO_OLD);
      }
      const holder = vols.find((v) => v.bitmaps.some((b) => b.name === name));
      if (holder) throw alreadyExists(`volume ${holder.volumeId} of disk ${diskId} already has a bitmap named ${name}`, Reason.BITMAP_EXISTS);
      return [{ name: `add-bitmap:${leaf.volumeId}`, volumeId: leaf.volumeId, operation: { $case: 'addBitmap', addBitmap: { name, granularityBytes } } }];
    });
  },
  run,
};

export const removeDiskBitmap: OperationKind<pb.RemoveDiskBitmapRequest, DiskBitmapParams> = {
  type: pb.OperationType.OPERATION_TYPE_REMOVE_DISK_BITMAP,
  waitForLocks: (req) => req.waitForLocks,
  prepare(env, req) {
    const name = validateBitmapName(req.bitmap);
    return prepared(env, req, (vols, diskId) => {
      const holders = vols.filter((v) => v.bitmaps.some((b) => b.name === name));
      if (holders.length === 0) throw notFound(`no volume of disk ${diskId} has a bitmap named ${name}`, Reason.BITMAP_NOT_FOUND);
      return holders.map((v) => ({ name: `remove-bitmap:${v.volumeId}`, volumeId: v.volumeId, operation: { $case: 'removeBitmap', removeBitmap: { name } } }));
    });
  },
  run,
};

export const clearDiskBitmaps: OperationKind<pb.ClearDiskBitmapsRequest, DiskBitmapParams> = {
  type: pb.OperationType.OPERATION_TYPE_CLEAR_DISK_BITMAPS,
  waitForLocks: (req) => req.waitForLocks,
  prepare(env, req) {
    return prepared(env, req, (vols) =>
      vols
        .filter((v) => v.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2)
        .map((v) => ({ name: `clear-bitmaps:${v.volumeId}`, volumeId: v.volumeId, operation: { $case: 'clearBitmaps', clearBitmaps: {} } })),
    );
  },
  run,
};
