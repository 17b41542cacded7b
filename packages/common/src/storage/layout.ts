import path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * On-disk layout of a storage domain, format v1 (see docs/storage-format.md).
 *
 *   <domain>/dom_md/metadata          domain record (key=value + CHECKSUM)
 *   <domain>/dom_md/ids               sanlock lockspace (delta leases), 1 MiB
 *   <domain>/dom_md/leases            sanlock resource leases, 1 MiB per slot
 *   <domain>/images/<imageId>/<volumeId>       volume data (raw or qcow2)
 *   <domain>/images/<imageId>/<volumeId>.meta  volume record
 *
 * Names starting with "_" and names containing ".tx-" are never listed by readers: they are
 * transactions in flight or garbage for the GC.
 */
export const FORMAT_VERSION = 1;
export const DOM_MD_DIR = 'dom_md';
export const IMAGES_DIR = 'images';
export const METADATA_FILE = 'metadata';
export const IDS_FILE = 'ids';
export const LEASES_FILE = 'leases';

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;
/** Size of the sanlock lockspace file (2000 hosts × 512-byte delta leases fit in 1 MiB). */
export const IDS_FILE_SIZE = MiB;
/** Size of one sanlock resource lease area (512-byte sectors, room for 2000 hosts). */
export const LEASE_SLOT_SIZE = MiB;
/**
 * The highest sanlock host id: lease areas are formatted for this many hosts (sanlock's num_hosts),
 * not the 2000 a 1 MiB area could hold. Each paxos acquire reads the ballot blocks of num_hosts
 * hosts twice: 2 × 1 MiB for 2000, 2 × 128 KiB for 250, which halves an acquire+release (4.8 → 2.5 ms
 * measured, bench/README.md). sanlock refuses a host id above an area's num_hosts.
 */
export const MAX_HOST_ID = 250;

/** Fixed resource leases at the start of dom_md/leases. */
export const DOMAIN_LEASE = { resource: 'SDM', slot: 0 } as const;
export const GC_LEASE = { resource: 'GC', slot: 1 } as const;
export const SPM_LEASE = { resource: 'SPM', slot: 2 } as const;
export const RESERVED_LEASES = [DOMAIN_LEASE, GC_LEASE, SPM_LEASE] as const;
/** Volume leases use slots FIRST_VOLUME_SLOT .. FIRST_VOLUME_SLOT + MAX_VOLUMES - 1. */
export const FIRST_VOLUME_SLOT = 3;

export const DEFAULT_MAX_VOLUMES = 2000;
export const MAX_MAX_VOLUMES = 100_000;
export const DEFAULT_IO_TIMEOUT_SECONDS = 10;

export const META_SUFFIX = '.meta';
/** Infix of temporary / uncommitted files: `<name>.tx-<txid>`. */
export const TX_INFIX = '.tx-';
/** Prefix of an uncommitted new image directory: `_tx_<txid>_<imageId>`. */
export const TX_PREFIX = '_tx_';
/** Prefix of deleted (garbage) images and volume files: `_deleted_<id>_<epoch ms>`. */
export const DELETED_PREFIX = '_deleted_';

/** Byte offset of a lease slot in dom_md/leases. */
export const leaseOffset = (slot: number): number => slot * LEASE_SLOT_SIZE;

// ---------------------------------------------------------------------------------------
// Transaction ids

/**
 * A transaction id names who opened a transaction, so a person (or the GC's log) can tell
 * from a marker name alone which host and process left it: `h<hostId>-p<pid>-t<epoch ms>-<8 hex>`.
 * It has no "_" and no "." so it can sit inside marker names unambiguously.
 */
export interface TxId {
  hostId: number;
  pid: number;
  startMs: number;
  random: string;
}

const TXID_RE = /^h(\d{1,4})-p(\d{1,10})-t(\d{1,15})-([0-9a-f]{8})$/;

export function newTxId(hostId: number, pid = process.pid, now = Date.now()): string {
  return `h${hostId}-p${pid}-t${now}-${randomBytes(4).toString('hex')}`;
}

export function parseTxId(txid: string): TxId | undefined {
  const m = TXID_RE.exec(txid);
  if (!m) return undefined;
  return { hostId: Number(m[1]), pid: Number(m[2]), startMs: Number(m[3]), random: m[4]! };
}

// ---------------------------------------------------------------------------------------
// Name classification (the single source of truth for readers and for the GC)

const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
const TXID = 'h\\d{1,4}-p\\d{1,10}-t\\d{1,15}-[0-9a-f]{8}';
const UUID_ONLY = new RegExp(`^${UUID}$`);
const TX_IMAGE = new RegExp(`^${TX_PREFIX}(${TXID})_(${UUID})$`);
const DELETED_ITEM = new RegExp(`^${DELETED_PREFIX}(${UUID})_(\\d{1,15})$`);
const META = new RegExp(`^(${UUID})\\.meta$`);
const META_TX = new RegExp(`^(${UUID})\\.meta\\.tx-(${TXID})$`);
const DELETED_META = new RegExp(`^${DELETED_PREFIX}(${UUID})_(\\d{1,15})\\.meta$`);

export type ImageEntry =
  | { kind: 'committed'; imageId: string }
  | { kind: 'tx'; imageId: string; txid: string }
  | { kind: 'deleted'; imageId: string; deletedMs: number }
  | { kind: 'foreign' };

/** What an entry of `<domain>/images/` is. */
export function classifyImageEntry(name: string): ImageEntry {
  if (UUID_ONLY.test(name)) return { kind: 'committed', imageId: name };
  let m = TX_IMAGE.exec(name);
  if (m) return { kind: 'tx', txid: m[1]!, imageId: m[2]! };
  m = DELETED_ITEM.exec(name);
  if (m) return { kind: 'deleted', imageId: m[1]!, deletedMs: Number(m[2]) };
  return { kind: 'foreign' };
}

export type VolumeEntry =
  | { kind: 'meta'; volumeId: string }
  | { kind: 'data'; volumeId: string }
  | { kind: 'meta-tx'; volumeId: string; txid: string }
  | { kind: 'deleted-meta'; volumeId: string; deletedMs: number }
  | { kind: 'deleted-data'; volumeId: string; deletedMs: number }
  | { kind: 'foreign' };

/** What an entry of an image directory is. */
export function classifyVolumeEntry(name: string): VolumeEntry {
  let m = META.exec(name);
  if (m) return { kind: 'meta', volumeId: m[1]! };
  if (UUID_ONLY.test(name)) return { kind: 'data', volumeId: name };
  m = META_TX.exec(name);
  if (m) return { kind: 'meta-tx', volumeId: m[1]!, txid: m[2]! };
  m = DELETED_META.exec(name);
  if (m) return { kind: 'deleted-meta', volumeId: m[1]!, deletedMs: Number(m[2]) };
  m = DELETED_ITEM.exec(name);
  if (m) return { kind: 'deleted-data', volumeId: m[1]!, deletedMs: Number(m[2]) };
  return { kind: 'foreign' };
}

// ---------------------------------------------------------------------------------------
// Paths. All ids are validated (see validation.ts) before they reach these helpers.

export class DomainLayout {
  constructor(readonly root: string) {}
  get domMdDir(): string {
    return path.join(this.root, DOM_MD_DIR);
  }
  get metadataPath(): string {
    return path.join(this.root, DOM_MD_DIR, METADATA_FILE);
  }
  get idsPath(): string {
    return path.join(this.root, DOM_MD_DIR, IDS_FILE);
  }
  get leasesPath(): string {
    return path.join(this.root, DOM_MD_DIR, LEASES_FILE);
  }
  get imagesDir(): string {
    return path.join(this.root, IMAGES_DIR);
  }
  imageDir(imageId: string): string {
    return path.join(this.imagesDir, imageId);
  }
  txImageDir(txid: string, imageId: string): string {
    return path.join(this.imagesDir, `${TX_PREFIX}${txid}_${imageId}`);
  }
  deletedImageDir(imageId: string, deletedMs: number): string {
    return path.join(this.imagesDir, `${DELETED_PREFIX}${imageId}_${deletedMs}`);
  }
}

export const volumeDataName = (volumeId: string) => volumeId;
export const volumeMetaName = (volumeId: string) => `${volumeId}${META_SUFFIX}`;
export const volumeMetaTxName = (volumeId: string, txid: string) => `${volumeId}${META_SUFFIX}${TX_INFIX}${txid}`;
export const deletedVolumeDataName = (volumeId: string, deletedMs: number) => `${DELETED_PREFIX}${volumeId}_${deletedMs}`;
export const deletedVolumeMetaName = (volumeId: string, deletedMs: number) => `${DELETED_PREFIX}${volumeId}_${deletedMs}${META_SUFFIX}`;
