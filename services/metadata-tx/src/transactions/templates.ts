/**
 * Templates and thin clones (docs/storage-format.md, "Templates and thin clones").
 *
 * A template is an image of exactly one volume, a base (no parent), whose record says
 * TEMPLATE=1: read-only from then on. A thin clone is a new image whose base volume is a qcow2
 * overlay on the template's volume: its record names the parent volume (PARENT_ID) and the
 * parent's image (PARENT_IMAGE_ID), so the relation is on storage, in the clone's own record.
 * Nothing is hard-linked or shared by name: the template's files stay in the template's image.
 *
 * - MarkTemplate: under the domain lease and the volume's lease (no data job may be writing it).
 * - A clone is created by CreateVolume with parent_image_id (create-volume.ts → prepareClone).
 * - Deleting a template is refused while a committed clone names it (countClones, under the
 *   domain lease, which every clone creation holds too: the count can't race a new clone).
 */
import path from 'node:path';
import {
  encodeVolumeRecord,
  failedPrecondition,
  listCommittedImageIds,
  listVolumeRecords,
  notFound,
  pb,
  Reason,
  SdmeshError,
  TX_INFIX,
  validateDomainPath,
  validateId,
  volumeMetaName,
  type VolumeRecord,
} from '@sdmesh/common';
import type { OpenDomain, TransactionCore, TransactionKind } from './core';
import type { PendingRecord, Prepared } from './new-volume';

interface MarkTemplateParams {
  root: string;
  imageId: string;
  operationId: string;
}

/** The one volume a template image must have; refuses chains, clones and ILLEGAL volumes. */
function templateCandidate(imageId: string, records: VolumeRecord[]): VolumeRecord {
  if (records.length !== 1) {
    throw failedPrecondition(
      `image ${imageId} has ${records.length} volumes; a template is one volume (copy the disk with collapse, then mark the copy)`,
      Reason.TEMPLATE_NOT_SINGLE_VOLUME,
    );
  }
  const volume = records[0]!;
  if (volume.parentImageId)
    throw failedPrecondition(`image ${imageId} is a thin clone of image ${volume.parentImageId}: it can't be a template`, Reason.DISK_IS_CLONE);
  if (volume.legality !== 'LEGAL') throw failedPrecondition(`volume ${volume.volumeId} of image ${imageId} is ILLEGAL`, Reason.DISK_ILLEGAL);
  return volume;
}

async function markTemplate(tx: TransactionCore, p: MarkTemplateParams, signal?: AbortSignal): Promise<pb.Volume> {
  const { imageId, operationId } = p;
  const domain = await tx.openDomain(p.root);
  return tx.underDomainLease(domain, { operationId, signal, keepsSlotIndex: true }, async () => {
    const listing = await tx.readImage(domain, imageId);
    tx.refuseUnreadable(listing, `cannot prove image ${imageId} is one volume`);
    const candidate = templateCandidate(imageId, listing.records);
    if (candidate.template) return tx.toVolume(domain, candidate); // a retry
    // Under the volume's lease: no data job is writing it now, and none can start (it checks the record under that lease).
    return tx.underVolumeLeases(domain, [candidate], { operationId, signal }, async () => {
      const again = await tx.readImage(domain, imageId);
      tx.refuseUnreadable(again, `cannot prove image ${imageId} is one volume`);
      const current = templateCandidate(imageId, again.records);
      const next: VolumeRecord = { ...current, template: true };
      tx.fault('update.before-write');
      await domain.dom.writeFileAtomic(path.join(domain.layout.imageDir(imageId), volumeMetaName(current.volumeId)), encodeVolumeRecord(next), {
        tempSuffix: TX_INFIX + tx.newTxId(),
        beforeCommit: () => tx.fault('update.before-rename'),
      });
      tx.fault('update.after-write');
      const volume = await tx.toVolume(domain, next);
      tx.publish({ $case: 'volume', volume: { kind: pb.VolumeEvent_Kind.KIND_UPDATED, volume, domainId: domain.md.domainId, imageId, operationId } });
      tx.opts.log?.info({ domainId: domain.md.domainId, imageId, volumeId: current.volumeId, operationId }, 'volume marked template');
      return volume;
    });
  });
}

export const markTemplateTransaction: TransactionKind<pb.MarkTemplateRequest, MarkTemplateParams, pb.Volume> = {
  op: 'mark_template',
  params: (req) => ({ root: validateDomainPath(req.domainPath), imageId: validateId('image id', req.imageId), operationId: req.operationId }),
  run: markTemplate,
};

/**
 * Checks for a thin clone (a new image on a template's volume): the template image exists in
 * this domain, its volume is the named parent, a LEGAL template. The clone takes the
 * template's capacity; the new image itself is checked like any new image (prepareNewImage).
 */
export async function prepareClone(tx: TransactionCore, domain: OpenDomain, pending: PendingRecord & { parentImageId: string }): Promise<Prepared> {
  const listing = await tx.readImage(domain, pending.parentImageId).catch((err: unknown) => {
    if (SdmeshError.from(err).reason === Reason.IMAGE_NOT_FOUND) {
      throw notFound(`template image ${pending.parentImageId} does not exist in domain ${domain.md.domainId}`, Reason.PARENT_NOT_FOUND);
    }
    throw err;
  });
  tx.refuseUnreadable(listing, `cannot read template image ${pending.parentImageId}`);
  const parent = listing.records.find((r) => r.volumeId === pending.parentId);
  if (!parent) throw notFound(`volume ${pending.parentId} is not in template image ${pending.parentImageId}`, Reason.PARENT_NOT_FOUND);
  if (!parent.template) throw failedPrecondition(`image ${pending.parentImageId} is not a template: mark it a template first`, Reason.NOT_A_TEMPLATE);
  if (parent.legality !== 'LEGAL') throw failedPrecondition(`template volume ${parent.volumeId} is ILLEGAL`, Reason.PARENT_ILLEGAL);
  return { pending: { ...pending, format: 'QCOW2', allocation: 'SPARSE', capacityBytes: parent.capacityBytes }, parentFormat: parent.format };
}

/**
 * Committed volumes of the domain whose parent lies in `templateImageId` (its thin clones).
 * An unreadable committed record could be a clone, so it makes the count fail: a refused
 * delete is better than a template deleted under a clone.
 */
export async function countClones(tx: TransactionCore, domain: OpenDomain, templateImageId: string): Promise<number> {
  let clones = 0;
  for (const imageId of await listCommittedImageIds(domain.root)) {
    if (imageId === templateImageId) continue;
    const listing = await listVolumeRecords(domain.layout.imageDir(imageId), { imageId, domainId: domain.md.domainId });
    tx.refuseUnreadable(listing, `cannot prove template image ${templateImageId} has no clones`);
    if (listing.records.some((r) => r.parentImageId === templateImageId)) clones++;
  }
  return clones;
}

/** Refuses to delete a template's volume while thin clones use it (under the domain lease). */
export async function refuseDeletingUsedTemplate(tx: TransactionCore, domain: OpenDomain, imageId: string, records: readonly VolumeRecord[]): Promise<void> {
  if (!records.some((r) => r.template)) return;
  const clones = await countClones(tx, domain, imageId);
  if (clones > 0) {
    throw failedPrecondition(`template image ${imageId} still backs ${clones} thin clone(s): delete them first`, Reason.TEMPLATE_HAS_CLONES);
  }
}
