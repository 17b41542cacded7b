/**
 * CreateVolume: a base volume in a new image, or a snapshot on an image's leaf. Under the
 * domain lease: check (a committed twin is a retry) → choose the lowest free lease slot (from
 * the hold's slot index, slot-index.ts, not a scan per create) →
 * reserve space for a preallocated volume → commit (create-new-image.ts, create-snapshot.ts)
 * → KIND_CREATED event.
 */
import {
  alreadyExists,
  invalidArgument,
  isUuid,
  pb,
  Reason,
  validateCapacity,
  validateDescription,
  validateDomainPath,
  validateId,
  VOLUME_ALLOCATION,
  VOLUME_FORMAT,
  type VolumeAllocationName,
  type VolumeFormatName,
  type VolumeRecord,
} from '@sdmesh/common';
import { fencedError } from '../operation-fences';
import { commitNewImage, prepareNewImage } from './create-new-image';
import { commitSnapshot, prepareSnapshot } from './create-snapshot';
import type { OpenDomain, TransactionCore, TransactionKind } from './core';
import type { PendingRecord, Prepared } from './new-volume';
import { prepareClone } from './templates';

export interface CreateVolumeParams {
  root: string;
  imageId: string;
  volumeId: string;
  /** '' for a base volume (a new image). */
  parentId: string;
  /** Set for a thin clone: the template's image (parentId is its volume); the new image's base is an overlay on it. */
  parentImageId: string;
  format: VolumeFormatName;
  allocation: VolumeAllocationName;
  capacityBytes: number;
  description: string;
  initiallyIllegal: boolean;
  operationId: string;
}

function createVolumeParams(req: pb.CreateVolumeRequest): CreateVolumeParams {
  const root = validateDomainPath(req.domainPath);
  const imageId = validateId('image id', req.imageId);
  const volumeId = validateId('volume id', req.volumeId);
  const parentId = req.parentId ? validateId('parent id', req.parentId) : '';
  const parentImageId = req.parentImageId ? validateId('parent image id', req.parentImageId) : '';
  if (parentImageId && !parentId) throw invalidArgument('a thin clone names its template volume in parent_id', Reason.INVALID_ID);
  if (parentImageId === imageId) throw invalidArgument('a thin clone is a new image: parent_image_id must name another image', Reason.INVALID_ID);
  // A snapshot and a thin clone are both qcow2 overlays, sparse, of their parent's capacity.
  const isSnapshot = parentId !== '';
  const format = VOLUME_FORMAT.fromPbOr(req.format, isSnapshot ? 'QCOW2' : 'RAW', 'format');
  if (isSnapshot && format !== 'QCOW2') throw invalidArgument('a snapshot volume must be qcow2', Reason.INVALID_FORMAT);
  const allocation = VOLUME_ALLOCATION.fromPbOr(req.allocation, 'SPARSE', 'allocation');
  if (isSnapshot && allocation === 'PREALLOCATED') throw invalidArgument('a snapshot volume is always sparse', Reason.INVALID_ALLOCATION);
  // A snapshot takes its parent's capacity unless a larger one is asked for (a chain copied after an extend).
  if (!isSnapshot || req.capacityBytes) validateCapacity(req.capacityBytes);
  if (parentId === volumeId) throw invalidArgument('a volume cannot be its own parent', Reason.INVALID_ID);
  const description = validateDescription(req.description);
  return {
    root,
    imageId,
    volumeId,
    parentId,
    parentImageId,
    format,
    allocation,
    capacityBytes: req.capacityBytes,
    description,
    initiallyIllegal: req.initiallyIllegal,
    operationId: req.operationId,
  };
}

async function createVolume(tx: TransactionCore, p: CreateVolumeParams, signal?: AbortSignal): Promise<pb.Volume> {
  const { imageId, volumeId, parentId, operationId } = p;
  const isSnapshot = parentId !== '' && !p.parentImageId;
  const domain = await tx.openDomain(p.root);

  // A new sparse image (not a snapshot or a clone, which read other images; not preallocated,
  // whose space check must see the others' allocations) may be pipelined with the next
  // transactions of its lease hold once its slot is chosen: it names what it creates, and what
  // it writes from then on (marker, record, lease area, data, commit) no later transaction of the
  // hold reads (they take slots from the index; one that scans waits until it has ended).
  const overlapKeys = parentId === '' && p.allocation !== 'PREALLOCATED' ? [imageId, volumeId] : undefined;
  return tx.underDomainLease(domain, { operationId, signal, overlapKeys, keepsSlotIndex: true }, async (hold) => {
    // A rollback fenced this operation (FenceOperation): nothing of it may commit. Checked in the
    // serial part, which is as late as just before the commit: a fence starts only after every
    // create of the hold in flight ended (operation-fences.ts). No storage read per create.
    if (isUuid(operationId) && (await tx.fences.isFenced({ id: domain.md.domainId, root: domain.root, dom: domain.dom }, hold, operationId))) {
      throw fencedError(operationId, domain.md.domainId);
    }
    const base = { volumeId, imageId, domainId: domain.md.domainId, description: p.description, generation: 0, ctimeMs: Date.now() };
    const legality = p.initiallyIllegal ? 'ILLEGAL' : 'LEGAL';
    const prepared = isSnapshot
      ? await prepareSnapshot(tx, domain, { ...base, parentId, legality }, p.capacityBytes)
      : p.parentImageId
        ? await prepareCloneImage(tx, domain, {
            ...base,
            parentId,
            parentImageId: p.parentImageId,
            format: 'QCOW2',
            allocation: 'SPARSE',
            capacityBytes: 0,
            legality,
          })
        : await prepareNewImage(domain, { ...base, parentId: '', format: p.format, allocation: p.allocation, capacityBytes: p.capacityBytes, legality });
    if ('committed' in prepared) return tx.toVolume(domain, prepared.committed);

    const slots = await tx.slotIndex(domain, hold);
    const owner = slots.committedImageOf(volumeId);
    if (owner) throw alreadyExists(`volume ${volumeId} already exists in image ${owner}`, Reason.VOLUME_EXISTS);
    if (prepared.pending.allocation === 'PREALLOCATED') await tx.checkSpaceFor(domain, prepared.pending.capacityBytes);
    const full: VolumeRecord = { ...prepared.pending, leaseSlot: slots.allocate() };
    hold.detach();

    const txid = tx.newTxId();
    let committed: VolumeRecord;
    // What the new image's data file allocates, as its writer saw it (no lookup of the committed name).
    let allocatedBytes: number | undefined;
    try {
      if (isSnapshot) committed = await commitSnapshot(tx, domain, full, { parentFormat: prepared.parentFormat ?? 'RAW', txid, signal });
      else ({ committed, allocatedBytes } = await commitNewImage(tx, domain, full, txid, signal, prepared.parentFormat));
    } catch (err) {
      // Whether it committed is unknown here: the next create of the domain scans again.
      tx.slotIndexes.forget(domain.md.domainId);
      throw err;
    }
    slots.committed(volumeId, imageId);
    const volume = await tx.toVolume(domain, committed, allocatedBytes ?? true);
    tx.publish({
      $case: 'volume',
      volume: { kind: pb.VolumeEvent_Kind.KIND_CREATED, volume, domainId: domain.md.domainId, imageId, operationId },
    });
    tx.opts.log?.info({ txid, domainId: domain.md.domainId, imageId, volumeId, slot: full.leaseSlot, operationId }, 'volume created');
    return volume;
  });
}

/** A thin clone: the template checked (prepareClone), then the new image like any other (a committed twin is a retry). */
async function prepareCloneImage(tx: TransactionCore, domain: OpenDomain, pending: PendingRecord & { parentImageId: string }): Promise<Prepared> {
  const clone = await prepareClone(tx, domain, pending);
  if ('committed' in clone) return clone;
  const image = await prepareNewImage(domain, clone.pending);
  return 'committed' in image ? image : clone;
}

export const createVolumeTransaction: TransactionKind<pb.CreateVolumeRequest, CreateVolumeParams, pb.Volume> = {
  op: 'create',
  params: createVolumeParams,
  run: createVolume,
};
