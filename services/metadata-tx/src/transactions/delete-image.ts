/**
 * DeleteImage: under the domain lease and every volume's lease (so no data job is using one),
 * commit with one rename of images/<img> to its _deleted_ name; the GC frees the rest.
 */
import { notFound, pb, Reason, validateDomainPath, validateId } from '@sdmesh/common';
import { exists, type OpenDomain, type TransactionCore, type TransactionKind } from './core';
import { refuseDeletingUsedTemplate } from './templates';

interface DeleteImageParams {
  root: string;
  imageId: string;
  operationId: string;
}

async function deleteImage(tx: TransactionCore, p: DeleteImageParams, signal?: AbortSignal): Promise<pb.DeleteImageResponse> {
  const { imageId, operationId } = p;
  const domain = await tx.openDomain(p.root);
  await tx.underDomainLease(domain, { operationId, signal }, async () => {
    if (!(await exists(domain.dom, domain.layout.imageDir(imageId), 'directory'))) throw notFound(`image ${imageId} does not exist`, Reason.IMAGE_NOT_FOUND);
    const { records } = await tx.readImage(domain, imageId);
    await refuseDeletingUsedTemplate(tx, domain, imageId, records);
    await tx.underVolumeLeases(domain, records, { operationId, signal }, () => renameImageToGarbage(tx, domain, imageId));
    tx.publish({
      $case: 'volume',
      volume: { kind: pb.VolumeEvent_Kind.KIND_IMAGE_DELETED, volume: undefined, domainId: domain.md.domainId, imageId, operationId },
    });
    tx.opts.log?.info({ domainId: domain.md.domainId, imageId, operationId }, 'image deleted');
  });
  return {};
}

/** The commit of an image's deletion: one rename of its directory to a _deleted_ name. */
export async function renameImageToGarbage(tx: TransactionCore, domain: OpenDomain, imageId: string): Promise<void> {
  tx.fault('delete.before-rename');
  await domain.dom.rename(domain.layout.imageDir(imageId), domain.layout.deletedImageDir(imageId, Date.now()));
  await domain.dom.fsyncDir(domain.layout.imagesDir);
  tx.fault('delete.after-rename');
}

export const deleteImageTransaction: TransactionKind<pb.DeleteImageRequest, DeleteImageParams, pb.DeleteImageResponse> = {
  op: 'delete_image',
  params: (req) => ({ root: validateDomainPath(req.domainPath), imageId: validateId('image id', req.imageId), operationId: req.operationId }),
  run: deleteImage,
};
