/**
 * CreateVolume of a snapshot (a qcow2 overlay on the image's LEGAL leaf). Steps: remove the
 * leftovers of an interrupted try → write <vol>.meta.tx-<txid> (the marker, which is also the
 * record) → format the lease slot → qemu-img create the overlay → fsync → commit with one
 * rename to <vol>.meta.
 */
import path from 'node:path';
import {
  alreadyExists,
  classifyVolumeEntry,
  encodeVolumeRecord,
  failedPrecondition,
  invalidArgument,
  notFound,
  QemuBitmaps,
  Reason,
  SdmeshError,
  volumeMetaName,
  volumeMetaTxName,
  type ConfinedRoot,
  type VolumeFormatName,
  type VolumeRecord,
} from '@sdmesh/common';
import { exists, throwIfAborted, type OpenDomain, type TransactionCore } from './core';
import { createVolumeData, sameShape, type PendingRecord, type Prepared } from './new-volume';

/** Checks for a snapshot: the image exists, the parent is its leaf (LEGAL, unless the snapshot is created ILLEGAL). */
export async function prepareSnapshot(
  tx: TransactionCore,
  domain: OpenDomain,
  partial: Omit<PendingRecord, 'format' | 'allocation' | 'capacityBytes'>,
  /** 0: the parent's capacity; more: a larger leaf (the source of a chain copy was extended). */
  requestedCapacity = 0,
): Promise<Prepared> {
  const listing = await tx.readImage(domain, partial.imageId);
  const pending: PendingRecord = { ...partial, format: 'QCOW2', allocation: 'SPARSE', capacityBytes: 0 };
  const parent = listing.records.find((r) => r.volumeId === partial.parentId);
  const same = listing.records.find((r) => r.volumeId === partial.volumeId);
  if (same) {
    if (parent && sameShape(same, { ...pending, capacityBytes: requestedCapacity || parent.capacityBytes })) return { committed: same };
    throw alreadyExists(`volume ${partial.volumeId} already exists in image ${partial.imageId}`, Reason.VOLUME_EXISTS);
  }
  tx.refuseUnreadable(listing, 'cannot prove the parent is the leaf');
  if (!parent) throw notFound(`parent volume ${partial.parentId} is not in image ${partial.imageId}`, Reason.PARENT_NOT_FOUND);
  if (listing.records.some((r) => r.parentId === parent.volumeId)) {
    throw failedPrecondition(`parent volume ${parent.volumeId} is not the leaf of image ${partial.imageId}`, Reason.PARENT_NOT_LEAF);
  }
  // An ILLEGAL overlay on an ILLEGAL parent is a chain being built by a copy (Copy/Move Disk creates
  // every target volume ILLEGAL, parent first, then fills them in parallel): nothing reads either
  // until its own copy job makes it LEGAL. A readable (LEGAL) snapshot needs a LEGAL parent.
  if (parent.legality !== 'LEGAL' && partial.legality !== 'ILLEGAL')
    throw failedPrecondition(`parent volume ${parent.volumeId} is ILLEGAL`, Reason.PARENT_ILLEGAL);
  if (parent.template) throw failedPrecondition(`image ${partial.imageId} is a template (read-only): clone it instead`, Reason.DISK_IS_TEMPLATE);
  if (requestedCapacity && requestedCapacity < parent.capacityBytes) {
    throw invalidArgument(
      `a snapshot of ${requestedCapacity} bytes would be smaller than its parent ${parent.volumeId} (${parent.capacityBytes} bytes)`,
      Reason.INVALID_CAPACITY,
    );
  }
  return { pending: { ...pending, capacityBytes: requestedCapacity || parent.capacityBytes }, parentFormat: parent.format };
}

export async function commitSnapshot(
  tx: TransactionCore,
  domain: OpenDomain,
  record: VolumeRecord,
  opts: { parentFormat: VolumeFormatName; txid: string; signal?: AbortSignal },
): Promise<VolumeRecord> {
  const { signal } = opts;
  const imageDir = domain.layout.imageDir(record.imageId);
  await removeUncommittedLeftovers(tx, domain.dom, imageDir, record.volumeId);
  const marker = path.join(imageDir, volumeMetaTxName(record.volumeId, opts.txid));
  const dataPath = path.join(imageDir, record.volumeId);
  let committed = false;
  try {
    const handle = await domain.dom.createFile(marker, 'record');
    try {
      await handle.writeFile(encodeVolumeRecord(record));
      await handle.sync();
    } finally {
      await handle.close();
    }
    await domain.dom.fsyncDir(imageDir);
    tx.fault('create.after-marker');
    tx.fault('create.after-meta');
    await tx.opts.leases.formatLeaseSlot(domain.ref, record.volumeId, record.leaseSlot);
    tx.fault('create.after-lease');
    throwIfAborted(signal);
    await createVolumeData(domain.dom, dataPath, record, { signal, parentFormat: opts.parentFormat, qemuImgBinary: tx.opts.qemuImgBinary });
    if (opts.parentFormat === 'QCOW2' && !record.parentImageId) await carryBitmaps(tx, domain, imageDir, record);
    tx.fault('create.after-data');
    await domain.dom.fsyncDir(imageDir);
    throwIfAborted(signal);
    tx.fault('create.before-commit');
    await domain.dom.rename(marker, path.join(imageDir, volumeMetaName(record.volumeId)));
    committed = true;
    await domain.dom.fsyncDir(imageDir);
    tx.fault('create.after-commit');
    return record;
  } catch (err) {
    if (!committed) {
      await domain.dom.unlink(marker).catch(() => undefined);
      if ((await domain.dom.typeOf(dataPath).catch(() => 'absent')) === 'file') await domain.dom.unlink(dataPath).catch(() => undefined);
    }
    throw err;
  }
}

/**
 * The new leaf gets the parent's valid dirty bitmaps (vdsm's create-volume with add_bitmaps), so
 * the writes that go to the leaf from now on are tracked there and an incremental backup keeps
 * working across the snapshot. Before the commit, so a crash leaves no half-carried leaf visible.
 * Like vdsm, a failure does not fail the snapshot: it is logged and counted (the next backup is a
 * full one).
 */
async function carryBitmaps(tx: TransactionCore, domain: OpenDomain, imageDir: string, record: VolumeRecord): Promise<void> {
  const parent = await domain.dom.openFile(path.join(imageDir, record.parentId), { kind: 'volume', notFoundReason: Reason.VOLUME_DATA_MISSING });
  try {
    const child = await domain.dom.openFile(path.join(imageDir, record.volumeId), { kind: 'volume', write: true });
    try {
      const bitmaps = new QemuBitmaps({ command: tx.opts.qemuImgBinary ? { file: tx.opts.qemuImgBinary, args: [] } : undefined });
      const carried = await bitmaps.carryTo(parent, child);
      if (carried.length) {
        await child.sync();
        tx.opts.log?.info({ volumeId: record.volumeId, parentId: record.parentId, bitmaps: carried }, 'dirty bitmaps carried to the new leaf');
      }
    } finally {
      await child.close();
    }
  } catch (err) {
    const e = SdmeshError.from(err);
    tx.metrics.failures.inc({ op: 'carry_bitmaps', reason: e.reason });
    tx.opts.log?.error(
      { volumeId: record.volumeId, parentId: record.parentId, err: e.message },
      'cannot carry dirty bitmaps to the new leaf: the next backup will be a full one',
    );
  } finally {
    await parent.close();
  }
}

/**
 * Before re-creating a volume id in an existing image, remove what an interrupted attempt
 * left: its data file (no committed .meta) and its .meta.tx-* markers. Under the domain lease
 * no transaction is in flight, so these are garbage by definition.
 */
async function removeUncommittedLeftovers(tx: TransactionCore, dom: ConfinedRoot, imageDir: string, volumeId: string): Promise<void> {
  let removed = false;
  for (const name of await dom.listNames(imageDir, ['file'])) {
    const entry = classifyVolumeEntry(name);
    if (entry.kind === 'meta-tx' && entry.volumeId === volumeId) {
      await dom.unlink(path.join(imageDir, name));
      removed = true;
    }
  }
  if (!(await exists(dom, path.join(imageDir, volumeMetaName(volumeId)), 'file')) && (await exists(dom, path.join(imageDir, volumeId), 'file'))) {
    await dom.unlink(path.join(imageDir, volumeId));
    removed = true;
  }
  if (removed) {
    await dom.fsyncDir(imageDir);
    tx.opts.log?.info({ imageDir, volumeId }, 'removed leftovers of an interrupted create of the same volume');
  }
}
