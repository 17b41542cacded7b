import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { decodeVolumeRecord, encodeVolumeRecord, pb, type VolumeRecord } from '@sdmesh/common/internal';
import { checkDomain, runCli, type CheckReport } from '@sdmesh/sdmctl';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';

/**
 * `sdmctl check` against domains made by the real metadata-tx engine (with the in-process
 * lease provider: the lease slots are zero-filled, so their names cannot be verified and
 * that is a warning), then corrupted by hand.
 */
const DOMAIN_ID = '5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d';
const IMG_A = '00000000-0000-4000-8000-00000000000a';
const IMG_B = '00000000-0000-4000-8000-00000000000b';
const VOL_A1 = '00000000-0000-4000-8000-0000000000a1';
const VOL_A2 = '00000000-0000-4000-8000-0000000000a2';
const VOL_B1 = '00000000-0000-4000-8000-0000000000b1';
const MiB = 1024 * 1024;

let root: string;
let domainPath: string;
let tx: MetadataTransactions;

const metaPath = (img: string, vol: string) => path.join(domainPath, 'images', img, `${vol}.meta`);
const readRecord = async (img: string, vol: string) => decodeVolumeRecord(await fs.readFile(metaPath(img, vol)), 'test');
/** Rewrites a record with a valid checksum: a corruption only the cross-record checks can see. */
const rewriteRecord = async (img: string, vol: string, change: Partial<VolumeRecord>) =>
  fs.writeFile(metaPath(img, vol), encodeVolumeRecord({ ...(await readRecord(img, vol)), ...change }));

const checks = (r: CheckReport, severity: 'violations' | 'warnings') => r[severity].map((f) => f.check).sort();

async function runCheck(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runCli(['check', domainPath, ...args], env, {
    out: { write: (t) => void (out += t) },
    err: { write: (t) => void (err += t) },
    tty: false,
    signal: new AbortController().signal,
  });
  return { code, out, err };
}

beforeEach(async () => {
  root = await fs.mkdtemp('/var/tmp/sdmesh-sdmctl-check-');
  domainPath = path.join(root, 'domain');
  tx = new MetadataTransactions({
    leases: new InProcessDomainLeaseProvider(),
    registry: new Registry(),
    hostId: 1,
    events: { publish: (payload) => pb.Event.fromPartial({ payload }) },
  });
  await tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name: 'check-me', path: domainPath, maxVolumes: 20 }));
  const create = (over: Partial<pb.CreateVolumeRequest>) =>
    tx.createVolume(
      pb.CreateVolumeRequest.fromPartial({ domainPath, capacityBytes: 16 * MiB, operationId: 'op', format: pb.VolumeFormat.VOLUME_FORMAT_RAW, ...over }),
    );
  await create({ imageId: IMG_A, volumeId: VOL_A1 });
  await create({ imageId: IMG_A, volumeId: VOL_A2, parentId: VOL_A1, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
  await create({ imageId: IMG_B, volumeId: VOL_B1 });
});

afterEach(async () => {
  await fs.rm(root, { recursive: true, force: true });
});

describe('sdmctl check', () => {
  it('passes a healthy domain (one chain of two volumes, one single volume)', async () => {
    const r = await checkDomain(domainPath);
    expect(r.ok).toBe(true);
    expect(r).toMatchObject({ domainId: DOMAIN_ID, domainName: 'check-me', images: 2, volumes: 3, illegalVolumes: 0, violations: [], garbage: [] });
    // In-process leases are zero-filled: a warning, not a violation.
    expect(checks(r, 'warnings')).toEqual(['lease-slot']);
    const { code, out } = await runCheck([]);
    expect(code).toBe(0);
    expect(out).toContain('OK: no violations');
    expect(out).toContain('2 disk(s), 3 volume(s)');
  });

  it("catches a volume's metadata edited by hand (checksum mismatch), exit 1", async () => {
    const file = metaPath(IMG_B, VOL_B1);
    await fs.writeFile(file, (await fs.readFile(file, 'utf8')).replace(/CAPACITY=\d+/, 'CAPACITY=999999488'));
    const r = await checkDomain(domainPath);
    expect(r.ok).toBe(false);
    expect(r.violations).toEqual([expect.objectContaining({ check: 'volume-metadata', where: `images/${IMG_B}/${VOL_B1}.meta`, reason: 'CHECKSUM_MISMATCH' })]);
    const { code, out } = await runCheck(['-o', 'json']);
    expect(code).toBe(1);
    expect(JSON.parse(out)).toMatchObject({ ok: false, violations: [{ check: 'volume-metadata', reason: 'CHECKSUM_MISMATCH' }] });
  });

  it('catches a duplicated lease slot (a record rewritten with a valid checksum)', async () => {
    const a1 = await readRecord(IMG_A, VOL_A1);
    await rewriteRecord(IMG_B, VOL_B1, { leaseSlot: a1.leaseSlot });
    const r = await checkDomain(domainPath);
    expect(r.ok).toBe(false);
    expect(checks(r, 'violations')).toEqual(['shared-lease-slot']);
    expect(r.violations[0]!.message).toContain(`lease slot ${a1.leaseSlot} is claimed by 2 volumes`);
    const { code, out } = await runCheck([]);
    expect(code).toBe(1);
    expect(out).toMatch(/VIOLATION\s+shared-lease-slot/);
    expect(out).toContain('FAILED: 1 violation(s)');
  });

  it('catches a slot shared with a deleted volume the GC has not collected yet', async () => {
    const b1 = await readRecord(IMG_B, VOL_B1);
    await tx.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: IMG_B, operationId: 'op' }));
    await rewriteRecord(IMG_A, VOL_A2, { leaseSlot: b1.leaseSlot });
    const r = await checkDomain(domainPath);
    expect(checks(r, 'violations')).toEqual(['shared-lease-slot']);
    expect(r.violations[0]!.message).toContain('deleted');
  });

  it('catches a missing parent, a record without data, and a slot outside the lease area', async () => {
    await rewriteRecord(IMG_A, VOL_A2, { parentId: '00000000-0000-4000-8000-0000000000ff' });
    await fs.rm(path.join(domainPath, 'images', IMG_B, VOL_B1));
    const r = await checkDomain(domainPath);
    expect(checks(r, 'violations')).toEqual(['missing-parent', 'volume-data']);
    await rewriteRecord(IMG_A, VOL_A1, { leaseSlot: 15 });
    expect(checks(await checkDomain(domainPath), 'violations')).toEqual(['lease-slot', 'missing-parent', 'volume-data']);
  });

  it('judges ILLEGAL volumes against running operations, or warns when they are unknown', async () => {
    const b1 = await readRecord(IMG_B, VOL_B1);
    await tx.updateVolume(
      pb.UpdateVolumeRequest.fromPartial({
        domainPath,
        imageId: IMG_B,
        volumeId: VOL_B1,
        generation: b1.generation,
        legality: pb.Legality.LEGALITY_ILLEGAL,
        operationId: 'op',
      }),
    );
    // No scheduler: a warning that says why.
    const unknown = await checkDomain(domainPath);
    expect(unknown.ok).toBe(true);
    expect(unknown.warnings.find((w) => w.check === 'illegal-volume')?.message).toContain('no scheduler address');
    // A scheduler with no running operation on that disk: a violation.
    const none = await checkDomain(domainPath, { activeTargets: async () => ({ targets: new Set() }) });
    expect(checks(none, 'violations')).toEqual(['illegal-volume']);
    // An operation targets the disk: fine.
    const busy = await checkDomain(domainPath, { activeTargets: async () => ({ targets: new Set([`storageDomains/${DOMAIN_ID}/disks/${IMG_B}`]) }) });
    expect(busy.ok).toBe(true);
    expect(busy.warnings.map((w) => w.check)).not.toContain('illegal-volume');
    // An unreachable scheduler: a warning naming it.
    const { code, out } = await runCheck(['--address', '127.0.0.1:1', '--call-timeout', '2', '--insecure']);
    expect(code).toBe(0);
    expect(out).toMatch(/WARNING\s+illegal-volume/);
    expect(out).toContain('scheduler at 127.0.0.1:1 did not answer');
  });

  it('lists garbage (deleted disks, interrupted transactions) without failing', async () => {
    await tx.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: IMG_B, operationId: 'op' }));
    await fs.mkdir(path.join(domainPath, 'images', `_tx_h2-p4242-t1700000000000-0badcafe_${'00000000-0000-4000-8000-0000000000cc'}`));
    const r = await checkDomain(domainPath);
    expect(r.ok).toBe(true);
    expect(r.garbage.map((g) => g.kind).sort()).toEqual(['deleted-image', 'uncommitted-image']);
    const { code, out } = await runCheck([]);
    expect(code).toBe(0);
    expect(out).toContain('garbage (the GC removes it)');
    expect(out).toContain('transaction h2-p4242-t1700000000000-0badcafe of host 2 pid 4242');
  });

  it('says plainly when the path is not a storage domain, and a corrupt domain record', async () => {
    const empty = path.join(root, 'empty');
    await fs.mkdir(empty);
    const r = await checkDomain(empty);
    expect(r.violations).toEqual([expect.objectContaining({ check: 'domain-metadata', message: `${empty} is not a storage domain (no dom_md/metadata)` })]);
    await fs.appendFile(path.join(domainPath, 'dom_md/metadata'), 'X=1\n');
    expect((await checkDomain(domainPath)).violations[0]).toMatchObject({ check: 'domain-metadata', reason: 'TORN_RECORD' });
  });
});
