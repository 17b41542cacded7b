/**
 * CreateVolume of a base volume, in a new image. Steps: mkdir images/_tx_<txid>_<img> (the
 * marker) + fsync images/ → write <vol>.meta → format the lease slot and create the data (at
 * once) → fsync record, data and directory → commit with one rename of the directory to
 * images/<img> + fsync images/. Interrupted: the GC removes the _tx_ directory.
 *
 * What is made durable, and when, is as strict as one step after the other, with less waiting:
 * the record is written under its final name inside the marker directory (no reader looks there
 * before the commit, and an unreadable record in a _tx_ directory is ignored, so a temp file and
 * rename would protect nothing); its fsync runs while the lease slot and the data are written,
 * and every fsync is done before the commit rename. The fsyncs of images/ are shared with the
 * other creates in flight (TransactionCore.syncImagesDir): each waits for one that started after
 * its own change.
 */
import path from 'node:path';
import {
  alreadyExists,
  classifyVolumeEntry,
  descriptor,
  encodeVolumeRecord,
  ioError,
  listVolumeRecords,
  Reason,
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
): Promise<{ committed: VolumeRecord; allocatedBytes: number }> {
  const { layout } = domain;
  const txDir = layout.txImageDir(txid, record.imageId);
  const dataPath = path.join(txDir, record.volumeId);
  let committed = false;
  let recordDurable: Promise<void> | undefined;
  /** Steps running at once: all settled before leftovers are removed. */
  let pending: Promise<void>[] = [];
  let allocatedBytes = 0;
  try {
    await domain.dom.mkdir(txDir);
    await tx.syncImagesDir(domain);
    tx.fault('create.after-marker');
    ({ durable: recordDurable } = await writeRecordUnsynced(domain.dom, path.join(txDir, volumeMetaName(record.volumeId)), encodeVolumeRecord(record)));
    tx.fault('create.after-meta');
    // The lease area (written by the lease-manager) and the data file (in the marker directory)
    // are independent: written at the same time, both before the commit.
    const leaseWritten = tx.opts.leases.formatLeaseSlot(domain.ref, record.volumeId, record.leaseSlot).then(() => tx.fault('create.after-lease'));
    const dataWritten = (async () => {
      throwIfAborted(signal);
      allocatedBytes = await createVolumeData(domain.dom, dataPath, record, { signal, parentFormat, qemuImgBinary: tx.opts.qemuImgBinary });
      tx.fault('create.after-data');
    })();
    pending = [recordDurable, leaseWritten, dataWritten];
    await Promise.all(pending);
    await domain.dom.fsyncDir(txDir);
    throwIfAborted(signal);
    tx.fault('create.before-commit');
    if (tx.opts.faultPause) await tx.pauseAt('create.before-commit');
    await domain.dom.rename(txDir, layout.imageDir(record.imageId));
    committed = true;
    await tx.syncImagesDir(domain);
    tx.fault('create.after-commit');
    return { committed: record, allocatedBytes };
  } catch (err) {
    // Not committed: nothing is visible. Remove what we made now rather than leave it for
    // the GC (safe: we still hold the domain lease, and no one can use an uncommitted slot).
    if (!committed) {
      await Promise.allSettled([recordDurable, ...pending]);
      await removeOwnTxDir(domain.dom, txDir).catch(() => undefined);
    }
    throw err;
  }
}

/**
 * Creates a record file (exclusively) and writes it; resolves when written, with `durable`: its
 * fsync (and close), which the caller must await before it commits.
 */
async function writeRecordUnsynced(dom: ConfinedRoot, file: string, data: Buffer): Promise<{ durable: Promise<void> }> {
  const fd = await dom.createFileDescriptor(file, 'record', data).catch((err: unknown) => {
    throw ioError(err, `${dom.relative(file)} in ${dom.root}`);
  });
  const durable = descriptor.syncAndClose(fd).catch((err: unknown) => {
    throw ioError(err, `${dom.relative(file)} in ${dom.root}`);
  });
  durable.catch(() => undefined); // awaited by the caller; not unhandled if it fails first on another step
  return { durable };
}

/** Removes a transaction directory this call made (its own files only, one by one). */
async function removeOwnTxDir(dom: ConfinedRoot, txDir: string): Promise<void> {
  for (const name of await dom.listNames(txDir, ['file'])) {
    if (classifyVolumeEntry(name).kind !== 'foreign') await dom.unlink(path.join(txDir, name));
  }
  await dom.rmdir(txDir);
}
