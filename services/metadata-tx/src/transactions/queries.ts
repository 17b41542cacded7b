/**
 * Reads: GetDomain, ListImages, ListVolumes, GetVolume. They take no lease: readers see
 * committed names only, and every commit is one rename.
 */
import path from 'node:path';
import {
  checkQcow2Header,
  DomainLayout,
  FORMAT_VERSION,
  GrpcStatus,
  ioError,
  listCommittedImageIds,
  listVolumeRecords,
  notFound,
  orderChain,
  pb,
  readDomainMetadata,
  readVolumeRecord,
  fail,
  Reason,
  SdmeshError,
  validateDomainPath,
  validateId,
  volumeMetaName,
  type DomainMetadata,
} from '@sdmesh/common';
import { qemuImgInfo } from '../qemu';
import { exists, type TransactionCore, type TransactionKind } from './core';

/** A domain's metadata, space and counts. Unreadable metadata gives status INVALID, not an error. */
export async function describeDomain(tx: TransactionCore, root: string): Promise<pb.StorageDomain> {
  let md: DomainMetadata;
  try {
    md = await readDomainMetadata(root);
  } catch (err) {
    const e = ioError(err, `domain ${root}`);
    if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`${root} is not a storage domain (no dom_md/metadata)`, Reason.DOMAIN_NOT_FOUND);
    const status = e.code === GrpcStatus.UNAVAILABLE ? pb.DomainStatus.DOMAIN_STATUS_UNREACHABLE : pb.DomainStatus.DOMAIN_STATUS_INVALID;
    return pb.StorageDomain.fromPartial({ path: root, status, statusMessage: e.message });
  }
  const imageIds = await listCommittedImageIds(root);
  let volumeCount = 0;
  for (const imageId of imageIds) {
    const listing = await listVolumeRecords(new DomainLayout(root).imageDir(imageId), { imageId, domainId: md.domainId });
    volumeCount += listing.records.length + listing.unreadable.length;
  }
  const space = await tx.refreshSpace(root, md);
  return pb.StorageDomain.fromPartial({
    id: md.domainId,
    name: md.name,
    path: root,
    status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE,
    capacityBytes: space.capacity,
    freeBytes: space.free,
    volumeCount,
    imageCount: imageIds.length,
    formatVersion: FORMAT_VERSION,
    createTime: new Date(md.ctimeMs),
  });
}

/** Which images ListImages returns: every one, or a page of them in id order. */
interface ListImagesParams {
  root: string;
  /** 0 = every image. */
  maxImages: number;
  /** Only ids after this one ('' = from the first). */
  afterImageId: string;
}

/** A page reads only its own images' records (the listing of the images directory is all that grows with the domain). */
async function listImages(tx: TransactionCore, p: ListImagesParams): Promise<pb.ListImagesResponse> {
  const domain = await tx.openDomain(p.root);
  const images: pb.Image[] = [];
  const ids = (await listCommittedImageIds(domain.root)).filter((id) => !p.afterImageId || id > p.afterImageId);
  let next = 0;
  for (; next < ids.length && (!p.maxImages || images.length < p.maxImages); next++) {
    const imageId = ids[next]!;
    const listing = await tx.readImage(domain, imageId).catch((err: unknown) => {
      // Deleted between listing and reading: skip it.
      if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return undefined;
      throw err;
    });
    if (!listing) continue;
    tx.reportUnreadable(listing, 'list_images');
    const volumes = await Promise.all(orderChain(listing.records).map((r) => tx.toVolume(domain, r)));
    images.push({ id: imageId, domainId: domain.md.domainId, volumes });
  }
  return { images, more: next < ids.length };
}

export const listImagesTransaction: TransactionKind<pb.ListImagesRequest, ListImagesParams, pb.ListImagesResponse> = {
  op: 'list_images',
  params: (req) => ({
    root: validateDomainPath(req.domainPath),
    maxImages: req.maxImages ?? 0,
    afterImageId: req.afterImageId ? validateId('after_image_id', req.afterImageId) : '',
  }),
  run: listImages,
};

/** An image's volumes, or with no image id every volume of the domain. */
interface ListVolumesParams {
  domainPath: string;
  imageId?: string;
}

async function listVolumes(tx: TransactionCore, p: ListVolumesParams): Promise<pb.ListVolumesResponse> {
  if (p.imageId === undefined) {
    const { images } = await tx.run(listImagesTransaction, { domainPath: p.domainPath, maxImages: 0, afterImageId: '' });
    return { volumes: images.flatMap((i) => i.volumes) };
  }
  const domain = await tx.openDomain(p.domainPath);
  const listing = await tx.readImage(domain, p.imageId);
  tx.reportUnreadable(listing, 'list_volumes');
  return { volumes: await Promise.all(orderChain(listing.records).map((r) => tx.toVolume(domain, r))) };
}

export const listVolumesTransaction: TransactionKind<pb.ListVolumesRequest, ListVolumesParams, pb.ListVolumesResponse> = {
  op: 'list_volumes',
  // Without an image id the path is checked by ListImages (as it always was).
  params: (req) =>
    req.imageId ? { domainPath: validateDomainPath(req.domainPath), imageId: validateId('image id', req.imageId) } : { domainPath: req.domainPath },
  run: listVolumes,
};

interface GetVolumeParams {
  root: string;
  imageId: string;
  volumeId: string;
}

/** A volume's record and `qemu-img info` of its data file alone (no backing opened). */
async function getVolume(tx: TransactionCore, p: GetVolumeParams, signal?: AbortSignal): Promise<pb.GetVolumeResponse> {
  const { imageId, volumeId } = p;
  const domain = await tx.openDomain(p.root);
  const imageDir = domain.layout.imageDir(imageId);
  const metaPath = path.join(imageDir, volumeMetaName(volumeId));
  const record = await readVolumeRecord(metaPath, { volumeId, imageId, domainId: domain.md.domainId }).catch((err: unknown) => {
    const e = ioError(err, metaPath);
    throw e.code === GrpcStatus.NOT_FOUND ? notFound(`volume ${volumeId} is not in image ${imageId}`, Reason.VOLUME_NOT_FOUND) : e;
  });
  const dataPath = path.join(imageDir, volumeId);
  if (!(await exists(domain.dom, dataPath, 'file'))) {
    throw fail(Reason.VOLUME_DATA_MISSING, `volume ${volumeId} has a record but no data file ${dataPath}`);
  }
  // The volume alone, opened confined, with the format its record states (no probing, no backing).
  const handle = await domain.dom.openFile(dataPath, { kind: 'volume' });
  let info;
  try {
    if (record.format === 'QCOW2') await checkQcow2Header(handle, `volume ${volumeId}`);
    info = await qemuImgInfo(handle, record.format, { signal, binary: tx.opts.qemuImgBinary });
  } finally {
    await handle.close();
  }
  const volume = await tx.toVolume(domain, record, false);
  volume.actualSizeBytes = info.actualSize;
  return { volume, qemuInfo: info };
}

export const getVolumeTransaction: TransactionKind<pb.GetVolumeRequest, GetVolumeParams, pb.GetVolumeResponse> = {
  op: 'get_volume',
  params: (req) => ({
    root: validateDomainPath(req.domainPath),
    imageId: validateId('image id', req.imageId),
    volumeId: validateId('volume id', req.volumeId),
  }),
  run: getVolume,
};
