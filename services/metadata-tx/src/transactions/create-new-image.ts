/**
 * CreateVolume of a base volume, in a new image. Steps: mkdir images/_tx_<txid>_<img> (the
 * marker) → write <vol>.meta → format the lease slot → create the data → fsync → commit with
 * one rename of the directory to images/<img>. Interrupted: the GC removes the _tx_ directory.
 */
import path from 'node:path';
import {
  alreadyExists,
  classifyVolumeEntry,
  encodeVolumeRecord,
  listVolumeRecords,
  Reason,
  TX_INFIX,
  volumeMetaName,
  type ConfinedRoot,
  type VolumeFormatName,
  type VolumeRecord,
} from '@sdmesh/common';
import { exists, throwIfAborted, type OpenDomain, type TransactionCore } from './core';
import { createVolumeData, sameShape, type PendingRecord, type Prepared } from './new-volume';

/**
 * Checks for a new image. A committed image with this id is either a retry of the same
 * request (return the committed volume) or a conflict.
 */
export async function prepareNewImage(domain: OpenDomain, pending: PendingRecord): Promise<Prepared> {
  const imageDir = domain.layout.imageDir(pending.imageId);
  if (await exists(domain.dom, imageDir, 'directory')) {
    const listing = await listVolumeRecords(imageDir, { imageId: pending.imageId, domainId: domain.md.domainId });
    const same = listing.records.find((r) => r.volumeId === pending.volumeId);
    if (same && sameShape(same, pending)) return { committed: same };
    throw alreadyExists(`image ${pending.imageId} already exists`, Reason.IMAGE_EXISTS);
  }
  return { pending };
}

export async function commitNewImage(
  tx: TransactionCore,
  domain: OpenDomain,
  record: VolumeRecord,
  txid: string,
  signal?: AbortSignal,
  parentFormat?: VolumeFormatName,
): Promise<VolumeRecord> {
  const { layout } = domain;
  const txDir = layout.txImageDir(txid, record.imageId);
  const dataPath = path.join(txDir, record.volumeId);
  let committed = false;
  try {
    await domain.dom.mkdir(txDir);
    await domain.dom.fsyncDir(layout.imagesDir);
    tx.fault('create.after-marker');
    await domain.dom.writeFileAtomic(path.join(txDir, volumeMetaName(record.volumeId)), encodeVolumeRecord(record), { tempSuffix: TX_INFIX + txid });
    tx.fault('create.after-meta');
    await tx.opts.leases.formatLeaseSlot(domain.ref, record.volumeId, record.leaseSlot);
    tx.fault('create.after-lease');
    throwIfAborted(signal);
    await createVolumeData(domain.dom, dataPath, record, { signal, parentFormat, qemuImgBinary: tx.opts.qemuImgBinary });
    tx.fault('create.after-data');
    await domain.dom.fsyncDir(txDir);
    throwIfAborted(signal);
    tx.fault('create.before-commit');
    await domain.dom.rename(txDir, layout.imageDir(record.imageId));
    committed = true;
    await domain.dom.fsyncDir(layout.imagesDir);
    tx.fault('create.after-commit');
    return record;
  } catch (err) {
    // Not committed: nothing is visible. Remove what we made now rather than leave it for
    // the GC (safe: we still hold the domain lease, and no one can use an uncommitted slot).
    if (!committed) await removeOwnTxDir(domain.dom, txDir).catch(() => undefined);
    throw err;
  }
}

/** Removes a transaction directory this call made (its own files only, one by one). */
async function removeOwnTxDir(dom: ConfinedRoot, txDir: string): Promise<void> {
  for (const name of await dom.listNames(txDir, ['file'])) {
    if (classifyVolumeEntry(name).kind !== 'foreign') await dom.unlink(path.join(txDir, name));
  }
  await dom.rmdir(txDir);
}
