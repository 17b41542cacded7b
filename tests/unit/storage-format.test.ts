import fs from 'node:fs/promises';
import path from 'node:path';
import { GrpcStatus, SdmeshError } from '@sdmesh/common';
import {
  classifyImageEntry,
  classifyVolumeEntry,
  decodeDomainMetadata,
  decodeVolumeRecord,
  encodeDomainMetadata,
  encodeRecord,
  encodeVolumeRecord,
  findGarbage,
  lowestFreeSlot,
  MAX_RECORD_BYTES,
  newTxId,
  parseTxId,
  readVolumeRecord,
  safeJoin,
  scanLeaseSlots,
  validateCapacity,
  validateDescription,
  validateDomainPath,
  validateId,
  writeFileAtomic,
  type VolumeRecord,
} from '../../packages/common/src/storage';

const DOMAIN = '0b6c3a1e-5d7f-4a2b-9c8d-1e2f3a4b5c6d';
const IMAGE = '1c7d4b2f-6e8a-4b3c-8d9e-2f3a4b5c6d7e';
const VOLUME = '2d8e5c3a-7f9b-4c4d-9e0f-3a4b5c6d7e8f';

const record = (over: Partial<VolumeRecord> = {}): VolumeRecord => ({
  volumeId: VOLUME,
  imageId: IMAGE,
  domainId: DOMAIN,
  parentId: '',
  format: 'QCOW2',
  allocation: 'SPARSE',
  capacityBytes: 1 << 30,
  legality: 'LEGAL',
  generation: 3,
  ctimeMs: 1_700_000_000_000,
  description: 'système — boot disk',
  leaseSlot: 7,
  ...over,
});

function expectError(fn: () => unknown, code: GrpcStatus, reason: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(SdmeshError);
  expect((caught as SdmeshError).code).toBe(code);
  expect((caught as SdmeshError).reason).toBe(reason);
}

describe('volume records', () => {
  it('round-trip through key=value text with a checksum and fit in 4096 bytes', () => {
    const r = record({ description: 'x'.repeat(256) });
    const bytes = encodeVolumeRecord(r);
    expect(bytes.length).toBeLessThanOrEqual(MAX_RECORD_BYTES);
    const text = bytes.toString('utf8');
    expect(text.startsWith('RECORD=sdmesh-volume\nFORMAT_VERSION=1\n')).toBe(true);
    expect(text).toMatch(/\nCHECKSUM=[0-9a-f]{64}\n$/);
    expect(decodeVolumeRecord(bytes, 'r')).toEqual(r);
    expect(decodeVolumeRecord(encodeVolumeRecord(record()), 'r')).toEqual(record());
  });

  it('detects a flipped byte as CHECKSUM_MISMATCH', () => {
    const bytes = Buffer.from(encodeVolumeRecord(record()));
    const at = bytes.indexOf('GENERATION=3') + 'GENERATION='.length;
    bytes[at] = '4'.charCodeAt(0);
    expectError(() => decodeVolumeRecord(bytes, 'r'), GrpcStatus.DATA_LOSS, 'CHECKSUM_MISMATCH');
  });

  it('detects torn (truncated) files at every length', () => {
    const bytes = encodeVolumeRecord(record());
    for (let n = 0; n < bytes.length; n++) {
      let caught: unknown;
      try {
        decodeVolumeRecord(bytes.subarray(0, n), 'r');
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(SdmeshError);
      expect((caught as SdmeshError).code).toBe(GrpcStatus.DATA_LOSS);
      expect(['TORN_RECORD', 'CHECKSUM_MISMATCH']).toContain((caught as SdmeshError).reason);
    }
  });

  it('refuses foreign files: other kinds, binaries, huge files, a domain record', () => {
    expectError(() => decodeVolumeRecord(Buffer.from('hello=world\n'), 'r'), GrpcStatus.DATA_LOSS, 'FOREIGN_RECORD');
    expectError(() => decodeVolumeRecord(Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]), 'r'), GrpcStatus.DATA_LOSS, 'FOREIGN_RECORD');
    expectError(() => decodeVolumeRecord(Buffer.alloc(MAX_RECORD_BYTES + 1, 'a'), 'r'), GrpcStatus.DATA_LOSS, 'FOREIGN_RECORD');
    const domainRecord = encodeDomainMetadata({
      domainId: DOMAIN,
      name: 'd',
      ctimeMs: 1,
      maxVolumes: 10,
      ioTimeoutSeconds: 10,
      leaseSlotSize: 1 << 20,
      firstVolumeSlot: 3,
    });
    expectError(() => decodeVolumeRecord(domainRecord, 'r'), GrpcStatus.DATA_LOSS, 'FOREIGN_RECORD');
    expect(decodeDomainMetadata(domainRecord, 'm').name).toBe('d');
  });

  it('rejects bad field values and unknown versions even with a valid checksum', () => {
    const fields = (version: number, format: string): Array<[string, string | number]> => [
      ['FORMAT_VERSION', version],
      ['VOLUME_ID', VOLUME],
      ['IMAGE_ID', IMAGE],
      ['DOMAIN_ID', DOMAIN],
      ['PARENT_ID', ''],
      ['FORMAT', format],
      ['ALLOCATION', 'SPARSE'],
      ['CAPACITY', 512],
      ['LEGALITY', 'LEGAL'],
      ['GENERATION', 0],
      ['CTIME_MS', 0],
      ['DESCRIPTION', ''],
      ['LEASE_SLOT', 3],
    ];
    expectError(() => decodeVolumeRecord(encodeRecord('sdmesh-volume', fields(2, 'RAW')), 'r'), GrpcStatus.FAILED_PRECONDITION, 'UNSUPPORTED_FORMAT_VERSION');
    expectError(() => decodeVolumeRecord(encodeRecord('sdmesh-volume', fields(1, 'VMDK')), 'r'), GrpcStatus.DATA_LOSS, 'CORRUPT_RECORD');
    expectError(() => decodeVolumeRecord(encodeRecord('sdmesh-volume', fields(1, 'RAW').slice(0, 5)), 'r'), GrpcStatus.DATA_LOSS, 'CORRUPT_RECORD');
  });

  it('reads files atomically written, and reports misplaced records as foreign', async () => {
    const dir = await fs.mkdtemp(path.join('/var/tmp', 'sdmesh-storage-'));
    try {
      const file = path.join(dir, `${VOLUME}.meta`);
      await writeFileAtomic(file, encodeVolumeRecord(record()), { tempSuffix: '.tx-test' });
      expect(await fs.readdir(dir)).toEqual([`${VOLUME}.meta`]);
      expect(await readVolumeRecord(file, { volumeId: VOLUME })).toEqual(record());
      await expect(readVolumeRecord(file, { imageId: VOLUME })).rejects.toMatchObject({ code: GrpcStatus.DATA_LOSS, reason: 'FOREIGN_RECORD' });
      await expect(readVolumeRecord(path.join(dir, 'missing.meta'))).rejects.toMatchObject({ code: GrpcStatus.NOT_FOUND, reason: 'VOLUME_NOT_FOUND' });
      await fs.writeFile(file, Buffer.alloc(100_000, 1));
      await expect(readVolumeRecord(file)).rejects.toMatchObject({ code: GrpcStatus.DATA_LOSS, reason: 'FOREIGN_RECORD' });
      // noReplace refuses to overwrite, and leaves no temp file behind.
      await expect(writeFileAtomic(file, encodeVolumeRecord(record()), { tempSuffix: '.tx-2', noReplace: true })).rejects.toThrow();
      expect(await fs.readdir(dir)).toEqual([`${VOLUME}.meta`]);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('validation', () => {
  it('accepts lowercase UUIDs only', () => {
    expect(validateId('volume id', VOLUME)).toBe(VOLUME);
    for (const bad of [VOLUME.toUpperCase(), '', 'abc', `${VOLUME}x`, '../etc', `${VOLUME.slice(0, 35)}/`, '2d8e5c3a7f9b4c4d9e0f3a4b5c6d7e8f']) {
      expectError(() => validateId('volume id', bad), GrpcStatus.INVALID_ARGUMENT, 'INVALID_ID');
    }
  });

  it('bounds descriptions at 256 UTF-8 bytes without control characters', () => {
    expect(validateDescription('é'.repeat(128))).toHaveLength(128);
    expectError(() => validateDescription('é'.repeat(129)), GrpcStatus.INVALID_ARGUMENT, 'TEXT_TOO_LONG');
    for (const bad of ['a\nb', 'a\rb', 'tab\t', 'nul\0', '\u0085', 'bad \ud800']) {
      expectError(() => validateDescription(bad), GrpcStatus.INVALID_ARGUMENT, 'INVALID_TEXT');
    }
  });

  it('checks capacities: > 0, 512-byte multiple, ≤ 64 TiB', () => {
    expect(validateCapacity(512)).toBe(512);
    expect(validateCapacity(64 * 2 ** 40)).toBe(64 * 2 ** 40);
    for (const bad of [0, -512, 1000, 64 * 2 ** 40 + 512, 1.5, Number.NaN]) {
      expectError(() => validateCapacity(bad), GrpcStatus.INVALID_ARGUMENT, 'INVALID_CAPACITY');
    }
  });

  it('refuses relative, dotted or NUL domain paths, and names that escape the domain', () => {
    expect(validateDomainPath('/srv/sd/dom1/')).toBe('/srv/sd/dom1');
    for (const bad of ['', 'relative/dom', './dom', '/srv/../etc', '/srv/dom\0x', '/']) {
      expectError(() => validateDomainPath(bad), GrpcStatus.INVALID_ARGUMENT, 'INVALID_PATH');
    }
    expect(safeJoin('/srv/dom', 'images', IMAGE)).toBe(`/srv/dom/images/${IMAGE}`);
    for (const bad of ['..', '.', '', 'a/b', '../x', 'x\0', '/etc']) {
      expectError(() => safeJoin('/srv/dom', 'images', bad), GrpcStatus.INVALID_ARGUMENT, 'INVALID_PATH');
    }
  });
});

describe('names and markers', () => {
  it('round-trips transaction ids that name host and pid', () => {
    const txid = newTxId(12, 4567, 1_700_000_000_123);
    expect(txid).toMatch(/^h12-p4567-t1700000000123-[0-9a-f]{8}$/);
    expect(parseTxId(txid)).toMatchObject({ hostId: 12, pid: 4567, startMs: 1_700_000_000_123 });
    expect(parseTxId('garbage')).toBeUndefined();
  });

  it('classifies image directory and volume entries', () => {
    const txid = newTxId(1);
    expect(classifyImageEntry(IMAGE)).toEqual({ kind: 'committed', imageId: IMAGE });
    expect(classifyImageEntry(`_tx_${txid}_${IMAGE}`)).toEqual({ kind: 'tx', imageId: IMAGE, txid });
    expect(classifyImageEntry(`_deleted_${IMAGE}_123`)).toEqual({ kind: 'deleted', imageId: IMAGE, deletedMs: 123 });
    expect(classifyImageEntry('lost+found').kind).toBe('foreign');
    expect(classifyVolumeEntry(`${VOLUME}.meta`)).toEqual({ kind: 'meta', volumeId: VOLUME });
    expect(classifyVolumeEntry(VOLUME)).toEqual({ kind: 'data', volumeId: VOLUME });
    expect(classifyVolumeEntry(`${VOLUME}.meta.tx-${txid}`)).toEqual({ kind: 'meta-tx', volumeId: VOLUME, txid });
    expect(classifyVolumeEntry(`_deleted_${VOLUME}_5.meta`)).toEqual({ kind: 'deleted-meta', volumeId: VOLUME, deletedMs: 5 });
    expect(classifyVolumeEntry(`_deleted_${VOLUME}_5`)).toEqual({ kind: 'deleted-data', volumeId: VOLUME, deletedMs: 5 });
    expect(classifyVolumeEntry(`${VOLUME}.lease`).kind).toBe('foreign');
  });
});

describe('lease slots and garbage', () => {
  let root: string;
  beforeEach(async () => {
    root = await fs.mkdtemp(path.join('/var/tmp', 'sdmesh-slots-'));
  });
  afterEach(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  const put = async (rel: string, data: Buffer | string) => {
    await fs.mkdir(path.dirname(path.join(root, rel)), { recursive: true });
    await fs.writeFile(path.join(root, rel), data);
  };
  const uuid = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;

  it('counts committed, in-flight and deleted-but-uncollected records; ignores torn uncommitted ones', async () => {
    const txid = newTxId(3);
    await put(`images/${IMAGE}/${uuid(1)}.meta`, encodeVolumeRecord(record({ volumeId: uuid(1), leaseSlot: 3 })));
    await put(`images/${IMAGE}/${uuid(2)}.meta.tx-${txid}`, encodeVolumeRecord(record({ volumeId: uuid(2), leaseSlot: 4 })));
    await put(`images/${IMAGE}/_deleted_${uuid(3)}_99.meta`, encodeVolumeRecord(record({ volumeId: uuid(3), leaseSlot: 6 })));
    await put(`images/_tx_${txid}_${uuid(9)}/${uuid(4)}.meta`, encodeVolumeRecord(record({ volumeId: uuid(4), imageId: uuid(9), leaseSlot: 8 })));
    await put(`images/_deleted_${uuid(8)}_1/${uuid(5)}.meta`, encodeVolumeRecord(record({ volumeId: uuid(5), imageId: uuid(8), leaseSlot: 5 })));
    await put(`images/${IMAGE}/${uuid(6)}.meta.tx-${newTxId(3)}`, 'RECORD=sdmesh-vol'); // torn, uncommitted
    const scan = await scanLeaseSlots(root);
    expect([...scan.usedSlots].sort((a, b) => a - b)).toEqual([3, 4, 5, 6, 8]);
    expect([...scan.committedVolumeIds.keys()]).toEqual([uuid(1)]);
    expect(lowestFreeSlot(scan.usedSlots, 100)).toBe(7);
    expectError(() => lowestFreeSlot(new Set([3, 4]), 2), GrpcStatus.RESOURCE_EXHAUSTED, 'NO_FREE_LEASE_SLOT');

    // A corrupt *committed* record makes allocation fail safe: its slot is unknown.
    await put(`images/${IMAGE}/${uuid(7)}.meta`, 'RECORD=sdmesh-volume\nFORMAT_VERSION=1\n');
    await expect(scanLeaseSlots(root)).rejects.toMatchObject({ code: GrpcStatus.DATA_LOSS, reason: 'TORN_RECORD' });
  });

  it('lists every garbage name with its transaction', async () => {
    const txid = newTxId(5, 42);
    await put(`images/${IMAGE}/${uuid(1)}.meta`, encodeVolumeRecord(record({ volumeId: uuid(1) })));
    await put(`images/${IMAGE}/${uuid(1)}`, '');
    await put(`images/${IMAGE}/${uuid(2)}`, ''); // data without .meta
    await put(`images/${IMAGE}/${uuid(2)}.meta.tx-${txid}`, 'x');
    await put(`images/${IMAGE}/_deleted_${uuid(3)}_7`, '');
    await put(`images/${IMAGE}/_deleted_${uuid(3)}_7.meta`, '');
    await put(`images/_tx_${txid}_${uuid(9)}/x`, '');
    await put(`images/_deleted_${uuid(8)}_11/x`, '');
    await put(`dom_md/metadata.tx-${txid}`, '');
    const garbage = await findGarbage(root);
    const byPath = Object.fromEntries(garbage.map((g) => [g.relativePath, g]));
    expect(Object.keys(byPath).sort()).toEqual(
      [
        `dom_md/metadata.tx-${txid}`,
        `images/${IMAGE}/${uuid(2)}`,
        `images/${IMAGE}/${uuid(2)}.meta.tx-${txid}`,
        `images/${IMAGE}/_deleted_${uuid(3)}_7`,
        `images/${IMAGE}/_deleted_${uuid(3)}_7.meta`,
        `images/_deleted_${uuid(8)}_11`,
        `images/_tx_${txid}_${uuid(9)}`,
      ].sort(),
    );
    expect(byPath[`images/_tx_${txid}_${uuid(9)}`]).toMatchObject({ kind: 'uncommitted-image', needsDomainLease: true, tx: { hostId: 5, pid: 42 } });
    expect(byPath[`images/_deleted_${uuid(8)}_11`]).toMatchObject({ kind: 'deleted-image', needsDomainLease: false, deletedMs: 11 });
    expect(byPath[`images/${IMAGE}/${uuid(2)}`]).toMatchObject({ kind: 'orphan-volume-data', needsDomainLease: true });
  });
});
