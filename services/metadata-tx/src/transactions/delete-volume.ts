/**
 * DeleteVolume: a leaf only. Under the domain lease and the volume's lease (a data job may be
 * using it): the last volume of an image deletes the image (one rename of the directory);
 * otherwise commit by renaming <vol>.meta to its _deleted_ name, then the data file likewise.
 */
import path from 'node:path';
import {
  deletedVolumeDataName,
  deletedVolumeMetaName,
  failedPrecondition,
  GrpcStatus,
  notFound,
  pb,
  Reason,
  SdmeshError,
  validateDomainPath,
  validateId,
  volumeMetaName,
  type VolumeListing,
} from '@sdmesh/common';
import type { OpenDomain, TransactionCore, TransactionKind } from './core';
import { renameImageToGarbage } from './delete-image';
import { refuseDeletingUsedTemplate } from './templates';

interface DeleteVolumeParams {
  root: string;
  imageId: string;
  volumeId: string;
  operationId: string;
}

async function deleteVolume(tx: TransactionCore, p: DeleteVolumeParams, signal?: AbortSignal): Promise<pb.DeleteVolumeResponse> {
  const { imageId, volumeId, operationId } = p;
  const domain = await tx.openDomain(p.root);
  await tx.underDomainLease(domain, { operationId, signal }, async () => {
    const listing = await tx.readImage(domain, imageId);
    const target = listing.records.find((r) => r.volumeId === volumeId);
    if (!target && !listing.unreadable.some((u) => u.volumeId === volumeId)) {
      throw notFound(`volume ${volumeId} is not in image ${imageId}`, Reason.VOLUME_NOT_FOUND);
    }
    tx.refuseUnreadable({ ...listing, unreadable: listing.unreadable.filter((u) => u.volumeId !== volumeId) }, 'cannot prove the volume is a leaf');
    const child = listing.records.find((r) => r.parentId === volumeId);
    if (child) throw failedPrecondition(`volume ${volumeId} has a child (${child.volumeId}); only a leaf can be deleted`, Reason.VOLUME_HAS_CHILDREN);

    if (target) await refuseDeletingUsedTemplate(tx, domain, imageId, [target]);
    const volume = target ? await tx.toVolume(domain, target, false) : undefined;
    // A volume a data job is writing (or reading) can't be deleted under it. An unreadable
    // record names no slot: there is no lease to take.
    await tx.underVolumeLeases(domain, target ? [target] : [], { operationId, signal }, () => commitVolumeDeletion(tx, domain, listing, p));
    tx.publish({
      $case: 'volume',
      volume: { kind: pb.VolumeEvent_Kind.KIND_DELETED, volume, domainId: domain.md.domainId, imageId, operationId },
    });
    tx.opts.log?.info({ domainId: domain.md.domainId, imageId, volumeId, operationId }, 'volume deleted');
  });
  return {};
}

/** The commit of a volume's deletion (also the last step of a merge's finalize); the caller holds the domain and volume leases. */
export async function commitVolumeDeletion(
  tx: TransactionCore,
  domain: OpenDomain,
  listing: VolumeListing,
  p: Pick<DeleteVolumeParams, 'imageId' | 'volumeId'>,
): Promise<void> {
  const { imageId, volumeId } = p;
  if (listing.records.length + listing.unreadable.length === 1) {
    // The last volume: deleting it deletes the image, in one rename of the directory.
    await renameImageToGarbage(tx, domain, imageId);
    return;
  }
  const imageDir = domain.layout.imageDir(imageId);
  const deletedMs = Date.now();
  tx.fault('delete.before-rename');
  // Commit: the record leaves its committed name. The data file left behind has no
  // .meta and is garbage too; renaming it as well is tidiness, not correctness.
  await domain.dom.rename(path.join(imageDir, volumeMetaName(volumeId)), path.join(imageDir, deletedVolumeMetaName(volumeId, deletedMs)));
  await domain.dom.fsyncDir(imageDir);
  tx.fault('delete.after-rename');
  await domain.dom.rename(path.join(imageDir, volumeId), path.join(imageDir, deletedVolumeDataName(volumeId, deletedMs))).catch((err: unknown) => {
    if (SdmeshError.from(err).code !== GrpcStatus.NOT_FOUND) throw err;
  });
  await domain.dom.fsyncDir(imageDir);
}

export const deleteVolumeTransaction: TransactionKind<pb.DeleteVolumeRequest, DeleteVolumeParams, pb.DeleteVolumeResponse> = {
  op: 'delete_volume',
  params: (req) => ({
    root: validateDomainPath(req.domainPath),
    imageId: validateId('image id', req.imageId),
    volumeId: validateId('volume id', req.volumeId),
    operationId: req.operationId,
  }),
  run: deleteVolume,
};
