import { createHash } from 'node:crypto';
import { GrpcStatus, SdmeshError } from '../errors';
import { FORMAT_VERSION } from './layout';
import { isUuid } from './validation';
import { fail, Reason } from '../reasons';

/**
 * Small records are UTF-8 `KEY=VALUE` lines. The first line names the record kind
 * (`RECORD=sdmesh-volume`), the last is `CHECKSUM=<sha256 hex of every byte before it>`.
 * A record is at most MAX_RECORD_BYTES so it is always written (and read) whole.
 */
export const MAX_RECORD_BYTES = 4096;
export const VOLUME_RECORD_KIND = 'sdmesh-volume';
export const DOMAIN_RECORD_KIND = 'sdmesh-domain';

/** A record that cannot be trusted: DATA_LOSS with a reason tests and operators can match. */
export const corruptRecord = (message: string, reason: string) => new SdmeshError(GrpcStatus.DATA_LOSS, message, reason);

const sha256 = (data: Buffer | string) => createHash('sha256').update(data).digest('hex');

export function encodeRecord(kind: string, fields: ReadonlyArray<readonly [string, string | number]>): Buffer {
  let body = `RECORD=${kind}\n`;
  for (const [key, value] of fields) {
    const text = String(value);
    if (!/^[A-Z][A-Z0-9_]*$/.test(key) || key === 'CHECKSUM' || key === 'RECORD') throw new Error(`bad record key ${key}`);
    if (text.includes('\n') || text.includes('\r') || text.includes('\0')) throw new Error(`record value for ${key} has a line break or NUL`);
    body += `${key}=${text}\n`;
  }
  const out = Buffer.from(`${body}CHECKSUM=${sha256(body)}\n`, 'utf8');
  if (out.length > MAX_RECORD_BYTES) throw new Error(`record is ${out.length} bytes; at most ${MAX_RECORD_BYTES} allowed`);
  return out;
}

/**
 * Parses and verifies a record. Every way a file can be wrong gives a DATA_LOSS SdmeshError:
 * FOREIGN_RECORD (not ours, or another kind), TORN_RECORD (cut short), CHECKSUM_MISMATCH,
 * CORRUPT_RECORD (malformed lines or duplicate keys).
 */
export function decodeRecord(kind: string, data: Buffer, where: string): Map<string, string> {
  if (data.length === 0) throw corruptRecord(`${where}: empty file (torn write?)`, 'TORN_RECORD');
  const expectedFirst = Buffer.from(`RECORD=${kind}\n`, 'utf8');
  if (!data.subarray(0, expectedFirst.length).equals(expectedFirst)) {
    // A prefix of the first line means the write was cut in its first bytes.
    if (data.length < expectedFirst.length && expectedFirst.subarray(0, data.length).equals(data)) {
      throw corruptRecord(`${where}: record cut short (torn write)`, 'TORN_RECORD');
    }
    throw corruptRecord(`${where}: not an sdmesh ${kind} record`, 'FOREIGN_RECORD');
  }
  if (data.length > MAX_RECORD_BYTES) throw corruptRecord(`${where}: ${data.length} bytes is too large for an sdmesh ${kind} record`, 'FOREIGN_RECORD');
  const marker = data.lastIndexOf('\nCHECKSUM=') + 1;
  if (marker <= 0 || data[data.length - 1] !== 0x0a) {
    throw corruptRecord(`${where}: record has no final checksum line (torn write)`, 'TORN_RECORD');
  }
  const body = data.subarray(0, marker);
  const stored = data.subarray(marker + 'CHECKSUM='.length, data.length - 1).toString('latin1');
  if (!/^[0-9a-f]{64}$/.test(stored)) throw corruptRecord(`${where}: malformed checksum line (torn write)`, 'TORN_RECORD');
  if (sha256(body) !== stored) throw corruptRecord(`${where}: checksum mismatch; the record is corrupt`, 'CHECKSUM_MISMATCH');
  const text = body.toString('utf8');
  if (text.includes('\0') || !Buffer.from(text, 'utf8').equals(body)) {
    throw corruptRecord(`${where}: record is not UTF-8 text`, 'CORRUPT_RECORD');
  }
  const fields = new Map<string, string>();
  for (const line of text.split('\n').slice(1, -1)) {
    const eq = line.indexOf('=');
    if (eq <= 0) throw corruptRecord(`${where}: malformed line ${JSON.stringify(line)}`, 'CORRUPT_RECORD');
    const key = line.slice(0, eq);
    if (fields.has(key)) throw corruptRecord(`${where}: duplicate key ${key}`, 'CORRUPT_RECORD');
    fields.set(key, line.slice(eq + 1));
  }
  return fields;
}

/** Field accessors that turn a missing or malformed value into CORRUPT_RECORD. */
class FieldReader {
  constructor(
    private readonly fields: Map<string, string>,
    private readonly where: string,
  ) {}
  string(key: string): string {
    const v = this.fields.get(key);
    if (v === undefined) throw corruptRecord(`${this.where}: missing key ${key}`, 'CORRUPT_RECORD');
    return v;
  }
  int(key: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    const v = this.string(key);
    const n = Number(v);
    if (!/^-?\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw corruptRecord(`${this.where}: ${key}=${v} is not a whole number in ${min}..${max}`, 'CORRUPT_RECORD');
    }
    return n;
  }
  oneOf<T extends string>(key: string, choices: readonly T[]): T {
    const v = this.string(key);
    if (!(choices as readonly string[]).includes(v)) throw corruptRecord(`${this.where}: ${key}=${v} is not one of ${choices.join(', ')}`, 'CORRUPT_RECORD');
    return v as T;
  }
  /** An optional key (absent in records written before it existed): its value, or undefined. */
  optional(key: string): string | undefined {
    return this.fields.get(key);
  }
  uuid(key: string, allowEmpty = false): string {
    const v = this.string(key);
    if (allowEmpty && v === '') return v;
    if (!isUuid(v)) throw corruptRecord(`${this.where}: ${key}=${v} is not a lowercase UUID`, 'CORRUPT_RECORD');
    return v;
  }
  version(): number {
    const v = this.int('FORMAT_VERSION', 0);
    if (v !== FORMAT_VERSION) {
      throw fail(Reason.UNSUPPORTED_FORMAT_VERSION, `${this.where}: format version ${v} is not supported (this build reads ${FORMAT_VERSION})`);
    }
    return v;
  }
}

// ---------------------------------------------------------------------------------------
// Volume record

export const VOLUME_FORMATS = ['RAW', 'QCOW2'] as const;
export const VOLUME_ALLOCATIONS = ['SPARSE', 'PREALLOCATED'] as const;
export const LEGALITIES = ['LEGAL', 'ILLEGAL'] as const;
export type VolumeFormatName = (typeof VOLUME_FORMATS)[number];
export type VolumeAllocationName = (typeof VOLUME_ALLOCATIONS)[number];
export type LegalityName = (typeof LEGALITIES)[number];

export interface VolumeRecord {
  volumeId: string;
  imageId: string;
  /** The domain the record was written in: a record copied from another domain is refused. */
  domainId: string;
  /** '' for a base volume. */
  parentId: string;
  format: VolumeFormatName;
  allocation: VolumeAllocationName;
  capacityBytes: number;
  legality: LegalityName;
  generation: number;
  /** Creation time, epoch milliseconds. */
  ctimeMs: number;
  description: string;
  /** Slot of the volume's lease in dom_md/leases. */
  leaseSlot: number;
  /**
   * The image of the parent when it is not this one: a thin clone's base names its template's
   * image ('' or absent = the parent is in this image). Key PARENT_IMAGE_ID, written only when set.
   */
  parentImageId?: string;
  /** A template volume: read-only for good, thin clones' backing. Key TEMPLATE=1, written only when set. */
  template?: boolean;
}

/** The record of a new base volume: raw, sparse, LEGAL, generation 0, created now, no parent, unless `fields` say otherwise. */
export function newVolumeRecord(
  fields: Pick<VolumeRecord, 'volumeId' | 'imageId' | 'domainId' | 'capacityBytes' | 'leaseSlot'> & Partial<VolumeRecord>,
): VolumeRecord {
  return { parentId: '', format: 'RAW', allocation: 'SPARSE', legality: 'LEGAL', generation: 0, ctimeMs: Date.now(), description: '', ...fields };
}

export function encodeVolumeRecord(r: VolumeRecord): Buffer {
  return encodeRecord(VOLUME_RECORD_KIND, [
    ['FORMAT_VERSION', FORMAT_VERSION],
    ['VOLUME_ID', r.volumeId],
    ['IMAGE_ID', r.imageId],
    ['DOMAIN_ID', r.domainId],
    ['PARENT_ID', r.parentId],
    ['FORMAT', r.format],
    ['ALLOCATION', r.allocation],
    ['CAPACITY', r.capacityBytes],
    ['LEGALITY', r.legality],
    ['GENERATION', r.generation],
    ['CTIME_MS', r.ctimeMs],
    ['DESCRIPTION', r.description],
    ['LEASE_SLOT', r.leaseSlot],
    // Optional keys, written only when set, so every other record stays as it always was.
    ...(r.parentImageId ? [['PARENT_IMAGE_ID', r.parentImageId] as const] : []),
    ...(r.template ? [['TEMPLATE', 1] as const] : []),
  ]);
}

export function decodeVolumeRecord(data: Buffer, where: string): VolumeRecord {
  const f = new FieldReader(decodeRecord(VOLUME_RECORD_KIND, data, where), where);
  f.version();
  return {
    volumeId: f.uuid('VOLUME_ID'),
    imageId: f.uuid('IMAGE_ID'),
    domainId: f.uuid('DOMAIN_ID'),
    parentId: f.uuid('PARENT_ID', true),
    format: f.oneOf('FORMAT', VOLUME_FORMATS),
    allocation: f.oneOf('ALLOCATION', VOLUME_ALLOCATIONS),
    capacityBytes: f.int('CAPACITY', 1),
    legality: f.oneOf('LEGALITY', LEGALITIES),
    generation: f.int('GENERATION', 0),
    ctimeMs: f.int('CTIME_MS', 0),
    description: f.string('DESCRIPTION'),
    leaseSlot: f.int('LEASE_SLOT', 0),
    ...optionalVolumeKeys(f, where),
  };
}

function optionalVolumeKeys(f: FieldReader, where: string): Pick<VolumeRecord, 'parentImageId' | 'template'> {
  const out: Pick<VolumeRecord, 'parentImageId' | 'template'> = {};
  if (f.optional('PARENT_IMAGE_ID') !== undefined) {
    out.parentImageId = f.uuid('PARENT_IMAGE_ID');
    if (f.string('PARENT_ID') === '') throw corruptRecord(`${where}: PARENT_IMAGE_ID without PARENT_ID`, 'CORRUPT_RECORD');
  }
  if (f.optional('TEMPLATE') !== undefined) out.template = f.oneOf('TEMPLATE', ['1'] as const) === '1';
  return out;
}

/** The image a volume's parent lies in (its own image unless the record names another). */
export const parentImageOf = (r: Pick<VolumeRecord, 'imageId' | 'parentImageId'>): string => r.parentImageId || r.imageId;

// ---------------------------------------------------------------------------------------
// Domain metadata

export interface DomainMetadata {
  domainId: string;
  name: string;
  /** Creation time, epoch milliseconds. */
  ctimeMs: number;
  /** Number of volume lease slots (slots FIRST_VOLUME_SLOT ..). */
  maxVolumes: number;
  /** sanlock io_timeout of the domain's lockspace. */
  ioTimeoutSeconds: number;
  leaseSlotSize: number;
  firstVolumeSlot: number;
}

export function encodeDomainMetadata(m: DomainMetadata): Buffer {
  return encodeRecord(DOMAIN_RECORD_KIND, [
    ['FORMAT_VERSION', FORMAT_VERSION],
    ['DOMAIN_ID', m.domainId],
    ['NAME', m.name],
    ['CTIME_MS', m.ctimeMs],
    ['MAX_VOLUMES', m.maxVolumes],
    ['IO_TIMEOUT', m.ioTimeoutSeconds],
    ['LEASE_SLOT_SIZE', m.leaseSlotSize],
    ['FIRST_VOLUME_SLOT', m.firstVolumeSlot],
  ]);
}

export function decodeDomainMetadata(data: Buffer, where: string): DomainMetadata {
  const f = new FieldReader(decodeRecord(DOMAIN_RECORD_KIND, data, where), where);
  f.version();
  return {
    domainId: f.uuid('DOMAIN_ID'),
    name: f.string('NAME'),
    ctimeMs: f.int('CTIME_MS', 0),
    maxVolumes: f.int('MAX_VOLUMES', 1),
    ioTimeoutSeconds: f.int('IO_TIMEOUT', 1),
    leaseSlotSize: f.int('LEASE_SLOT_SIZE', 512),
    firstVolumeSlot: f.int('FIRST_VOLUME_SLOT', 0),
  };
}
