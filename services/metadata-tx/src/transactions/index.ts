/**
 * The metadata operations of metadata-tx, one module per kind over a shared transaction core
 * (core.ts). MetadataTransactions is the facade handlers and tests call; each method routes
 * a request to its kind:
 *   format-domain.ts  FormatDomain
 *   create-volume.ts  CreateVolume (create-new-image.ts, create-snapshot.ts, new-volume.ts)
 *   delete-volume.ts  DeleteVolume
 *   delete-image.ts   DeleteImage
 *   update-volume.ts  UpdateVolume
 *   finalize-merge.ts FinalizeMerge (the records of DeleteSnapshot after its data merge)
 *   templates.ts      MarkTemplate; thin clones (CreateVolume with parent_image_id); no template deleted under its clones
 *   queries.ts        GetDomain, ListImages, ListVolumes, GetVolume (no lease)
 *   spm.ts            AcquireSpmLease (SPM mode)
 *   fence-operation.ts FenceOperation (a rollback's fence against a late create; ../operation-fences.ts)
 */
import { pb, validateDomainPath } from '@sdmesh/common';
import { TransactionCore, type MetadataTransactionsOptions } from './core';
import { createVolumeTransaction } from './create-volume';
import { deleteImageTransaction } from './delete-image';
import { deleteVolumeTransaction } from './delete-volume';
import { fenceOperationTransaction } from './fence-operation';
import { finalizeMergeTransaction } from './finalize-merge';
import { formatDomainTransaction } from './format-domain';
import { describeDomain, getVolumeTransaction, listImagesTransaction, listVolumesTransaction } from './queries';
import { markTemplateTransaction } from './templates';
import { updateVolumeTransaction } from './update-volume';

export type { MetadataTransactionsOptions } from './core';
export { SpmLeases } from './spm';

export class MetadataTransactions {
  private readonly core: TransactionCore;

  constructor(opts: MetadataTransactionsOptions) {
    this.core = new TransactionCore(opts);
  }

  get metrics() {
    return this.core.metrics;
  }

  formatDomain(req: pb.FormatDomainRequest): Promise<pb.StorageDomain> {
    return this.core.run(formatDomainTransaction, req);
  }

  /** Not measured: a status read, also used by monitoring. */
  getDomain(req: pb.GetDomainRequest): Promise<pb.StorageDomain> {
    return describeDomain(this.core, validateDomainPath(req.path));
  }

  createVolume(req: pb.CreateVolumeRequest, signal?: AbortSignal): Promise<pb.Volume> {
    return this.core.run(createVolumeTransaction, req, signal);
  }

  deleteVolume(req: pb.DeleteVolumeRequest, signal?: AbortSignal): Promise<pb.DeleteVolumeResponse> {
    return this.core.run(deleteVolumeTransaction, req, signal);
  }

  deleteImage(req: pb.DeleteImageRequest, signal?: AbortSignal): Promise<pb.DeleteImageResponse> {
    return this.core.run(deleteImageTransaction, req, signal);
  }

  updateVolume(req: pb.UpdateVolumeRequest, signal?: AbortSignal): Promise<pb.Volume> {
    return this.core.run(updateVolumeTransaction, req, signal);
  }

  finalizeMerge(req: pb.FinalizeMergeRequest, signal?: AbortSignal): Promise<pb.FinalizeMergeResponse> {
    return this.core.run(finalizeMergeTransaction, req, signal);
  }

  markTemplate(req: pb.MarkTemplateRequest, signal?: AbortSignal): Promise<pb.Volume> {
    return this.core.run(markTemplateTransaction, req, signal);
  }

  fenceOperation(req: pb.FenceOperationRequest, signal?: AbortSignal): Promise<pb.FenceOperationResponse> {
    return this.core.run(fenceOperationTransaction, req, signal);
  }

  /** Every image of the domain, or a page of them (max_images, after_image_id). */
  listImages(req: Pick<pb.ListImagesRequest, 'domainPath'> & Partial<pb.ListImagesRequest>): Promise<pb.ListImagesResponse> {
    return this.core.run(listImagesTransaction, { maxImages: 0, afterImageId: '', ...req });
  }

  listVolumes(req: pb.ListVolumesRequest): Promise<pb.ListVolumesResponse> {
    return this.core.run(listVolumesTransaction, req);
  }

  getVolume(req: pb.GetVolumeRequest, signal?: AbortSignal): Promise<pb.GetVolumeResponse> {
    return this.core.run(getVolumeTransaction, req, signal);
  }
}
