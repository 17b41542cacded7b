import path from 'node:path';
import { corruptRecord, decodeDomainMetadata, decodeVolumeRecord, type DomainMetadata, type VolumeRecord } from './records';
import { ioError } from './fsio';
import { ConfinedRoot, type DirListing } from './confined';
import { isFenceExpired, parseFenceName } from './fences';
import { MAX_RECORD_BYTES } from './records';
import { classifyImageEntry, classifyVolumeEntry, DomainLayout, FIRST_VOLUME_SLOT, parseTxId, volumeMetaName, type TxId } from './layout';
import { GrpcStatus, resourceExhausted, SdmeshError } from '../errors';
import { Reason } from '../reasons';

/** Reads and verifies `<domain>/dom_md/metadata`. NOT_FOUND (DOMAIN_NOT_FOUND) if absent. */
export async function readDomainMetadata(root: string): Promise<DomainMetadata> {
  const layout = new DomainLayout(root);
  // Not 'record': format commits it with link(2), so it has two names for a moment.
  const data = await new ConfinedRoot(root).readSmallFile(layout.metadataPath, MAX_RECORD_BYTES, { kind: 'file', notFoundReason: Reason.DOMAIN_NOT_FOUND });
  return decodeDomainMetadata(data, layout.metadataPath);
}

/** Reads and verifies one volume record; checks it describes the volume its name says. */
export async function readVolumeRecord(
  file: string,
  expect?: { volumeId?: string; imageId?: string; domainId?: string },
  dom = recordDomain(file),
): Promise<VolumeRecord> {
  const data = await dom.readSmallFile(file, MAX_RECORD_BYTES, { kind: 'record', notFoundReason: Reason.VOLUME_NOT_FOUND }).catch((err: unknown) => {
    throw ioError(err, `volume record ${file}`, Reason.VOLUME_NOT_FOUND);
  });
  const record = decodeVolumeRecord(data, file);
  for (const [key, want] of Object.entries(expect ?? {}) as Array<[keyof VolumeRecord, string | undefined]>) {
    if (want !== undefined && record[key] !== want) {
      throw corruptRecord(`${file}: record says ${key}=${record[key]} but it belongs to ${want}; foreign or misplaced record`, 'FOREIGN_RECORD');
    }
  }
  return record;
}

/** The domain a volume record or data file lies in: `<root>/images/<image>/<name>`. */
export function recordDomain(file: string): ConfinedRoot {
  return new ConfinedRoot(path.resolve(file, '..', '..', '..'));
}

/** The domain an image directory lies in: `<root>/images/<image>`. */
export function imageDirDomain(imageDir: string): ConfinedRoot {
  return new ConfinedRoot(path.resolve(imageDir, '..', '..'));
}

/** Entries skipped by a listing because of their type (symlinks, FIFOs, devices ...). */
export type SkippedEntries = DirListing['skipped'];

async function listOrEmpty(dom: ConfinedRoot, dir: string, expect: Parameters<ConfinedRoot['list']>[1], skipped?: SkippedEntries): Promise<string[]> {
  try {
    const listing = await dom.list(dir, expect);
    skipped?.push(...listing.skipped);
    return listing.entries.map((e) => e.name);
  } catch (err) {
    const e = ioError(err, `directory ${dir}`);
    if (e.code === GrpcStatus.NOT_FOUND) return [];
    throw e;
  }
}

/** Committed image ids (directory names that are plain UUIDs), sorted. */
export async function listCommittedImageIds(root: string, skipped?: SkippedEntries): Promise<string[]> {
  const names = await listOrEmpty(new ConfinedRoot(root), new DomainLayout(root).imagesDir, ['directory'], skipped);
  return names
    .map(classifyImageEntry)
    .flatMap((e) => (e.kind === 'committed' ? [e.imageId] : []))
    .sort();
}

export interface VolumeListing {
  records: VolumeRecord[];
  /** Committed records that could not be read (each a DATA_LOSS or I/O SdmeshError). */
  unreadable: Array<{ volumeId: string; file: string; error: SdmeshError }>;
}

/** Committed volume records of one image directory (only `<uuid>.meta` names). */
export async function listVolumeRecords(imageDir: string, expect: { imageId: string; domainId?: string }): Promise<VolumeListing> {
  const out: VolumeListing = { records: [], unreadable: [] };
  const dom = imageDirDomain(imageDir);
  const skipped: SkippedEntries = [];
  const metas = (await listOrEmpty(dom, imageDir, ['file'], skipped)).flatMap((name) => {
    const entry = classifyVolumeEntry(name);
    return entry.kind === 'meta' ? [{ volumeId: entry.volumeId, file: path.join(imageDir, name) }] : [];
  });
  // Read at once (a chain's records are small files: waiting for each in turn only adds latency), kept in listing order.
  const reads = await Promise.allSettled(metas.map((m) => readVolumeRecord(m.file, { volumeId: m.volumeId, ...expect }, dom)));
  for (const [i, r] of reads.entries()) {
    const { volumeId, file } = metas[i]!;
    if (r.status === 'fulfilled') out.records.push(r.value);
    else out.unreadable.push({ volumeId, file, error: ioError(r.reason, file) });
  }
  // A committed record name holding a symlink, FIFO, device or directory: unreadable, never followed.
  for (const s of skipped) {
    const entry = classifyVolumeEntry(s.name);
    if (entry.kind !== 'meta') continue;
    out.unreadable.push({
      volumeId: entry.volumeId,
      file: path.join(imageDir, s.name),
      error: new SdmeshError(GrpcStatus.FAILED_PRECONDITION, s.reason, s.type === 'symlink' ? Reason.SYMLINK_REFUSED : Reason.UNEXPECTED_FILE_TYPE),
    });
  }
  return out;
}

/** Orders an image's volumes base first, leaf last (ties and broken links by ctime). */
export function orderChain(records: VolumeRecord[]): VolumeRecord[] {
  const byParent = new Map<string, VolumeRecord[]>();
  for (const r of records) byParent.set(r.parentId, [...(byParent.get(r.parentId) ?? []), r]);
  const ids = new Set(records.map((r) => r.volumeId));
  const out: VolumeRecord[] = [];
  const seen = new Set<string>();
  const roots = records.filter((r) => r.parentId === '' || !ids.has(r.parentId)).sort((a, b) => a.ctimeMs - b.ctimeMs);
  const visit = (r: VolumeRecord) => {
    if (seen.has(r.volumeId)) return;
    seen.add(r.volumeId);
    out.push(r);
    for (const child of (byParent.get(r.volumeId) ?? []).sort((a, b) => a.ctimeMs - b.ctimeMs)) visit(child);
  };
  roots.forEach(visit);
  records.filter((r) => !seen.has(r.volumeId)).forEach(visit);
  return out;
}

// ---------------------------------------------------------------------------------------
// Slot allocation

export interface SlotScan {
  /** Slots claimed by any record: committed, in flight (.meta.tx-*), or deleted but not yet collected. */
  usedSlots: Set<number>;
  /** Volume ids of committed records anywhere in the domain (ids are unique per domain). */
  committedVolumeIds: Map<string, { imageId: string }>;
}

/**
 * Reads every volume record in the domain, whatever its state, to find the lease slots in use.
 * Only valid while the caller holds the domain metadata lease: that is what makes the scan and
 * the following create one atomic step across hosts.
 *
 * An unreadable *committed or deleted* record makes the scan fail (its slot is unknown, so no
 * slot can be proven free). An unreadable *uncommitted* record (`.meta.tx-*`, or inside a
 * `_tx_` image) is ignored: it was never committed, so no one can hold a lease on its slot.
 */
export async function scanLeaseSlots(root: string): Promise<SlotScan> {
  const layout = new DomainLayout(root);
  const dom = new ConfinedRoot(root);
  const scan: SlotScan = { usedSlots: new Set(), committedVolumeIds: new Map() };
  const images = (await listOrEmpty(dom, layout.imagesDir, ['directory'])).filter((name) => classifyImageEntry(name).kind !== 'foreign');
  // SCAN_IMAGES_AT_ONCE images at a time, each image's records at once (one after the other, a
  // domain of thousands of records takes that many waits for storage); what each image adds,
  // and the error that fails the scan (the first in listing order), are as before.
  const scanned: Promise<ScannedRecord[]>[] = [];
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < images.length; i = next++) {
      scanned[i] = scanImageSlots(dom, path.join(layout.imagesDir, images[i]!));
      await scanned[i]!.catch(() => undefined);
    }
  };
  await Promise.all(Array.from({ length: Math.min(SCAN_IMAGES_AT_ONCE, images.length) }, worker));
  for (const image of scanned) {
    for (const r of await image) {
      scan.usedSlots.add(r.leaseSlot);
      if (r.committed) scan.committedVolumeIds.set(r.volumeId, { imageId: r.committed });
    }
  }
  return scan;
}

const SCAN_IMAGES_AT_ONCE = 16;

/** A record's slot, and its image id when it is a committed record of a committed image. */
interface ScannedRecord {
  leaseSlot: number;
  volumeId: string;
  committed?: string;
}

/** The records of one image directory for scanLeaseSlots (its rules on unreadable records). */
async function scanImageSlots(dom: ConfinedRoot, imageDir: string): Promise<ScannedRecord[]> {
  const image = classifyImageEntry(path.basename(imageDir));
  const skipped: SkippedEntries = [];
  const names = await listOrEmpty(dom, imageDir, ['file'], skipped);
  // A record name holding something other than a file is as unreadable as a torn record.
  const oddRecord = skipped.find((x) => classifyVolumeEntry(x.name).kind === 'meta' || classifyVolumeEntry(x.name).kind === 'deleted-meta');
  if (oddRecord && image.kind !== 'tx') {
    throw new SdmeshError(
      GrpcStatus.FAILED_PRECONDITION,
      `cannot allocate a lease slot: ${oddRecord.reason}`,
      oddRecord.type === 'symlink' ? Reason.SYMLINK_REFUSED : Reason.UNEXPECTED_FILE_TYPE,
    );
  }
  const records = names.flatMap((name) => {
    const entry = classifyVolumeEntry(name);
    if (entry.kind !== 'meta' && entry.kind !== 'meta-tx' && entry.kind !== 'deleted-meta') return [];
    return [
      {
        file: path.join(imageDir, name),
        trusted: image.kind !== 'tx' && entry.kind !== 'meta-tx',
        committed: image.kind === 'committed' && entry.kind === 'meta',
      },
    ];
  });
  const reads = await Promise.allSettled(records.map((r) => readVolumeRecord(r.file, undefined, dom)));
  const out: ScannedRecord[] = [];
  for (const [i, read] of reads.entries()) {
    const { file, trusted, committed } = records[i]!;
    if (read.status === 'fulfilled') {
      out.push({
        leaseSlot: read.value.leaseSlot,
        volumeId: read.value.volumeId,
        committed: committed && image.kind === 'committed' ? image.imageId : undefined,
      });
    } else if (trusted) {
      const e = ioError(read.reason, file);
      throw new SdmeshError(e.code, `cannot allocate a lease slot: ${e.message}`, e.reason);
    }
  }
  return out;
}

/** Lowest slot in [FIRST_VOLUME_SLOT, FIRST_VOLUME_SLOT + maxVolumes) not in use. */
export function lowestFreeSlot(usedSlots: ReadonlySet<number>, maxVolumes: number, firstSlot = FIRST_VOLUME_SLOT): number {
  for (let slot = firstSlot; slot < firstSlot + maxVolumes; slot++) if (!usedSlots.has(slot)) return slot;
  throw resourceExhausted(
    `all ${maxVolumes} volume lease slots of the domain are in use (deleted volumes free theirs once collected)`,
    Reason.NO_FREE_LEASE_SLOT,
  );
}

// ---------------------------------------------------------------------------------------
// Garbage (for the GC)

export type GarbageKind =
  | 'uncommitted-image' // images/_tx_<txid>_<imageId>/
  | 'deleted-image' // images/_deleted_<imageId>_<ms>/
  | 'uncommitted-volume-meta' // images/<img>/<vol>.meta.tx-<txid>
  | 'orphan-volume-data' // images/<img>/<vol> with no <vol>.meta
  | 'deleted-volume-meta' // images/<img>/_deleted_<vol>_<ms>.meta
  | 'deleted-volume-data' // images/<img>/_deleted_<vol>_<ms>
  | 'uncommitted-domain-metadata' // dom_md/metadata.tx-<txid>
  | 'expired-fence'; // dom_md/fence_<operationId>_<ms>, older than the fence retention (fences.ts)

export interface GarbageItem {
  kind: GarbageKind;
  /** Path relative to the domain root. */
  relativePath: string;
  imageId?: string;
  volumeId?: string;
  /** For transaction leftovers: the transaction and who opened it. */
  txid?: string;
  tx?: TxId;
  /** For deleted items: when they were deleted (epoch ms). */
  deletedMs?: number;
  /** For expired fences: the operation fenced and when (epoch ms, from the name). */
  operationId?: string;
  fencedMs?: number;
  /**
   * True for leftovers of transactions. They are garbage only when seen while holding the
   * domain metadata lease (no transaction can be in flight then); without it they may be a
   * transaction running right now.
   */
  needsDomainLease: boolean;
}

/** When findGarbage takes a fence for expired (defaults: now, DEFAULT_FENCE_RETENTION_MS). */
export interface GarbageClock {
  nowMs?: number;
  fenceRetentionMs?: number;
}

/** Lists every garbage name in a domain (see docs/storage-format.md, "What is garbage"). */
export async function findGarbage(root: string, skipped?: SkippedEntries, clock: GarbageClock = {}): Promise<GarbageItem[]> {
  const layout = new DomainLayout(root);
  const dom = new ConfinedRoot(root);
  const out: GarbageItem[] = [];
  // Only names of the expected type are garbage: a symlink, FIFO or device under a garbage
  // name is skipped (and reported), never followed or removed.
  for (const name of await listOrEmpty(dom, layout.domMdDir, ['file'], skipped)) {
    const m = /^metadata\.tx-(.+)$/.exec(name);
    if (m) out.push({ kind: 'uncommitted-domain-metadata', relativePath: `dom_md/${name}`, txid: m[1], tx: parseTxId(m[1]!), needsDomainLease: true });
    // An expired fence (strictly named; any other name is left alone). Under the domain lease, as
    // every dom_md change: FenceOperation and the creates' checks read the fences under it.
    const fence = parseFenceName(name);
    if (fence && isFenceExpired(fence.fencedMs, clock.nowMs ?? Date.now(), clock.fenceRetentionMs)) {
      out.push({ kind: 'expired-fence', relativePath: `dom_md/${name}`, operationId: fence.operationId, fencedMs: fence.fencedMs, needsDomainLease: true });
    }
  }
  for (const imageName of await listOrEmpty(dom, layout.imagesDir, ['directory'], skipped)) {
    const image = classifyImageEntry(imageName);
    const rel = `images/${imageName}`;
    if (image.kind === 'tx') {
      out.push({ kind: 'uncommitted-image', relativePath: rel, imageId: image.imageId, txid: image.txid, tx: parseTxId(image.txid), needsDomainLease: true });
      continue;
    }
    if (image.kind === 'deleted') {
      out.push({ kind: 'deleted-image', relativePath: rel, imageId: image.imageId, deletedMs: image.deletedMs, needsDomainLease: false });
      continue;
    }
    if (image.kind !== 'committed') continue;
    const imageSkipped: SkippedEntries = [];
    const names = await listOrEmpty(dom, path.join(layout.imagesDir, imageName), ['file'], imageSkipped);
    skipped?.push(...imageSkipped);
    // A record name taken by something that is not a file still counts as present: its data is not an orphan.
    const present = new Set([...names, ...imageSkipped.map((x) => x.name)]);
    for (const name of names) {
      const entry = classifyVolumeEntry(name);
      const base = { relativePath: `${rel}/${name}`, imageId: image.imageId };
      switch (entry.kind) {
        case 'meta-tx':
          out.push({ ...base, kind: 'uncommitted-volume-meta', volumeId: entry.volumeId, txid: entry.txid, tx: parseTxId(entry.txid), needsDomainLease: true });
          break;
        case 'data':
          if (!present.has(volumeMetaName(entry.volumeId))) out.push({ ...base, kind: 'orphan-volume-data', volumeId: entry.volumeId, needsDomainLease: true });
          break;
        case 'deleted-meta':
          out.push({ ...base, kind: 'deleted-volume-meta', volumeId: entry.volumeId, deletedMs: entry.deletedMs, needsDomainLease: false });
          break;
        case 'deleted-data':
          out.push({ ...base, kind: 'deleted-volume-data', volumeId: entry.volumeId, deletedMs: entry.deletedMs, needsDomainLease: false });
          break;
        default:
          break;
      }
    }
  }
  return out;
}
