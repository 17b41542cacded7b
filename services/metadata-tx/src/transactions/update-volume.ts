/**
 * UpdateVolume: legality, description and generation of one volume's record. Under the domain
 * lease and the volume's lease (data jobs rewrite the record under the volume lease alone):
 * re-read, check the generation the caller expected, write the record atomically.
 */
import path from 'node:path';
import {
  encodeVolumeRecord,
  failedPrecondition,
  GrpcStatus,
  invalidArgument,
  ioError,
  LEGALITY,
  notFound,
  pb,
  readVolumeRecord,
  Reason,
  TX_INFIX,
  validateDescription,
  validateDomainPath,
  validateId,
  volumeMetaName,
  type VolumeRecord,
} from '@sdmesh/common';
import type { OpenDomain, TransactionCore, TransactionKind } from './core';

interface UpdateVolumeParams {
  root: string;
  imageId: string;
  volumeId: string;
  /** The generation the caller last saw: the update is refused if the volume moved on. */
  generation: number;
  bumpGeneration: boolean;
  /** Unchanged when undefined. */
  legality?: VolumeRecord['legality'];
  description?: string;
  operationId: string;
}

function updateVolumeParams(req: pb.UpdateVolumeRequest): UpdateVolumeParams {
  const root = validateDomainPath(req.domainPath);
  const imageId = validateId('image id', req.imageId);
  const volumeId = validateId('volume id', req.volumeId);
  if (!Number.isSafeInteger(req.generation) || req.generation < 0) {
    throw invalidArgument(`generation ${req.generation} must be a whole number ≥ 0`, Reason.INVALID_GENERATION);
  }
  const legality = req.legality === pb.Legality.LEGALITY_UNSPECIFIED ? undefined : LEGALITY.fromPb(req.legality, 'legality');
  const description = req.description === undefined ? undefined : validateDescription(req.description);
  return { root, imageId, volumeId, generation: req.generation, bumpGeneration: req.bumpGeneration, legality, description, operationId: req.operationId };
}

async function updateVolume(tx: TransactionCore, p: UpdateVolumeParams, signal?: AbortSignal): Promise<pb.Volume> {
  const { operationId } = p;
  const domain = await tx.openDomain(p.root);
  return tx.underDomainLease(domain, { operationId, signal, keepsSlotIndex: true }, async () => {
    // The slot comes from the record; the record is read again under the volume's lease.
    const { leaseSlot } = await readCurrentRecord(domain, p);
    return tx.underVolumeLeases(domain, [{ volumeId: p.volumeId, leaseSlot }], { operationId, signal }, async () => {
      const current = await readCurrentRecord(domain, p);
      if (current.generation !== p.generation) {
        throw failedPrecondition(
          `volume ${p.volumeId} is at generation ${current.generation}, the request expected ${p.generation}`,
          Reason.GENERATION_MISMATCH,
        );
      }
      const next: VolumeRecord = {
        ...current,
        legality: p.legality ?? current.legality,
        description: p.description ?? current.description,
        generation: current.generation + (p.bumpGeneration ? 1 : 0),
      };
      tx.fault('update.before-write');
      await domain.dom.writeFileAtomic(metaPathOf(domain, p), encodeVolumeRecord(next), {
        tempSuffix: TX_INFIX + tx.newTxId(),
        beforeCommit: () => tx.fault('update.before-rename'),
      });
      tx.fault('update.after-write');
      const volume = await tx.toVolume(domain, next);
      tx.publish({
        $case: 'volume',
        volume: { kind: pb.VolumeEvent_Kind.KIND_UPDATED, volume, domainId: domain.md.domainId, imageId: p.imageId, operationId },
      });
      return volume;
    });
  });
}

const metaPathOf = (domain: OpenDomain, p: UpdateVolumeParams) => path.join(domain.layout.imageDir(p.imageId), volumeMetaName(p.volumeId));

function readCurrentRecord(domain: OpenDomain, p: UpdateVolumeParams): Promise<VolumeRecord> {
  const metaPath = metaPathOf(domain, p);
  return readVolumeRecord(metaPath, { volumeId: p.volumeId, imageId: p.imageId, domainId: domain.md.domainId }).catch((err: unknown) => {
    const e = ioError(err, metaPath);
    throw e.code === GrpcStatus.NOT_FOUND ? notFound(`volume ${p.volumeId} is not in image ${p.imageId}`, Reason.VOLUME_NOT_FOUND) : e;
  });
}

export const updateVolumeTransaction: TransactionKind<pb.UpdateVolumeRequest, UpdateVolumeParams, pb.Volume> = {
  op: 'update',
  params: updateVolumeParams,
  run: updateVolume,
};
