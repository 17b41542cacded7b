import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { fenceFileName, parseFenceName, pb, Reason } from '@sdmesh/common';
import { InProcessDomainLeaseProvider, type DomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { decodeFenceRecord, encodeFenceRecord, MAX_LISTED_FENCES, type OperationFences } from '../../services/metadata-tx/src/operation-fences';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';

/**
 * Operation fences (operation-fences.ts): a rollback's FenceOperation against a CreateVolume of
 * the same operation, in both orders, on one host and across two, with real files and the
 * in-process lease (one lease for both "hosts", its version bumped on every acquire as sanlock's).
 */
const OP = 'a0000000-0000-4000-8000-000000000001';
const OTHER_OP = 'a0000000-0000-4000-8000-000000000002';
const DOMAIN_ID = 'c0ffee00-0000-4000-8000-0000000000f1';
const image = (n: number) => `d0000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
const volume = (n: number) => `e0000000-0000-4000-8000-${String(n).padStart(12, '0')}`;

let root: string;
let domainPath: string;
beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'sdmesh-fences-'));
  domainPath = path.join(root, 'd');
});
afterEach(() => fs.rm(root, { recursive: true, force: true, maxRetries: 5, retryDelay: 50 }));

/** Providers of one versioned lease for several hosts; `gate` holds every lease-area format (a create past its checks) until opened. */
function versionedLease() {
  const inner = new InProcessDomainLeaseProvider();
  let lver = 0;
  let gate: Promise<void> | undefined;
  const provider = (): DomainLeaseProvider => ({
    tryVolumeLease: inner.tryVolumeLease.bind(inner),
    formatDomainLeases: inner.formatDomainLeases.bind(inner),
    formatLeaseSlot: async (...args) => {
      await gate;
      return inner.formatLeaseSlot(...args);
    },
    withDomainLease: (domain, op, fn, signal) => inner.withDomainLease(domain, op, () => fn({ lver: ++lver }), signal),
  });
  return {
    provider,
    hold(): () => void {
      let open!: () => void;
      gate = new Promise((resolve) => (open = resolve));
      return () => {
        gate = undefined;
        open();
      };
    },
  };
}

const metadataTx = (leases: DomainLeaseProvider, hostId = 1) => new MetadataTransactions({ leases, registry: new Registry(), hostId });
const fencesOf = (tx: MetadataTransactions) => (tx as unknown as { core: { fences: OperationFences } }).core.fences;
const create = (tx: MetadataTransactions, n: number, operationId: string) =>
  tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: image(n), volumeId: volume(n), capacityBytes: 1 << 20, operationId }));
const fence = (tx: MetadataTransactions, operationId = OP) => tx.fenceOperation({ domainPath, operationId });
const imagesOnStorage = async () => (await fs.readdir(path.join(domainPath, 'images'))).sort();
const fenceFiles = async () => (await fs.readdir(path.join(domainPath, 'dom_md'))).filter((n) => n.startsWith('fence_'));
const format = (tx: MetadataTransactions) =>
  tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name: 'd', path: domainPath, maxVolumes: 50 }));

describe('operation fences: a rollback fence and a create of the same operation', () => {
  it('fence first: a later create of the operation fails ABORTED OPERATION_FENCED and writes nothing; other operations still create', async () => {
    const lease = versionedLease();
    const tx = metadataTx(lease.provider());
    await format(tx);
    await create(tx, 1, OTHER_OP); // the fences are known to this process from here on
    await fence(tx);
    expect(await fenceFiles()).toHaveLength(1);
    await expect(create(tx, 2, OP)).rejects.toMatchObject({ code: 10, reason: Reason.OPERATION_FENCED });
    expect(await imagesOnStorage()).toEqual([image(1)]); // no committed image, no _tx_ marker
    await create(tx, 3, OTHER_OP);
    expect(await imagesOnStorage()).toEqual([image(1), image(3)]);
    // Fencing again is a no-op (a rollback retried).
    await fence(tx);
    expect(await fenceFiles()).toHaveLength(1);
  });

  it('fence first on another host: the create on a host that knew the fences before sees the gap in the lease version and reads them again', async () => {
    const lease = versionedLease();
    const [h1, h2] = [metadataTx(lease.provider(), 1), metadataTx(lease.provider(), 2)];
    await format(h1);
    await create(h1, 1, OTHER_OP);
    const readsBefore = fencesOf(h1).reads;
    await fence(h2);
    await expect(create(h1, 2, OP)).rejects.toMatchObject({ reason: Reason.OPERATION_FENCED });
    expect(fencesOf(h1).reads).toBe(readsBefore + 1);
    expect(await imagesOnStorage()).toEqual([image(1)]);
  });

  it.each([
    ['in the same hold of one host', false],
    ['from another host', true],
  ])('create first (past its checks, %s): the fence waits for it, so the commit is on storage before the fence answers', async (_how, otherHost) => {
    const lease = versionedLease();
    const h1 = metadataTx(lease.provider(), 1);
    const h2 = otherHost ? metadataTx(lease.provider(), 2) : h1;
    await format(h1);
    const release = lease.hold();
    const order: string[] = [];
    const creating = create(h1, 1, OP).then(() => order.push('create committed'));
    // The create holds the lease, past its fence check, in its lease-area format.
    for (let i = 0; i < 100 && !(await fs.readdir(path.join(domainPath, 'images'))).some((n) => n.startsWith('_tx_')); i++)
      await new Promise((r) => setTimeout(r, 10));
    const fencing = fence(h2).then(() => order.push('fenced'));
    await new Promise((r) => setTimeout(r, 100));
    expect(order).toEqual([]); // the fence waits for the lease (or for the create in its own hold)
    release();
    await Promise.all([creating, fencing]);
    expect(order).toEqual(['create committed', 'fenced']);
    // What a rollback's look after its fence sees: the committed image, which it deletes.
    expect(await imagesOnStorage()).toEqual([image(1)]);
    // And from now on no create of the operation commits (a retry of it included).
    await expect(create(h1, 2, OP)).rejects.toMatchObject({ reason: Reason.OPERATION_FENCED });
  });

  it('no storage read per create: the fences are read once while the lease version shows no other holder', async () => {
    const lease = versionedLease();
    const tx = metadataTx(lease.provider());
    await format(tx);
    for (let n = 1; n <= 6; n++) await create(tx, n, `a0000000-0000-4000-8000-00000000010${n}`); // one hold each (the queue drains)
    await Promise.all(Array.from({ length: 8 }, (_, i) => create(tx, 10 + i, `a0000000-0000-4000-8000-00000000020${i}`)));
    expect(fencesOf(tx).reads).toBe(1);
    // A fence this process writes is known at once, without a read.
    await fence(tx);
    await expect(create(tx, 30, OP)).rejects.toMatchObject({ reason: Reason.OPERATION_FENCED });
    expect(fencesOf(tx).reads).toBe(1);
  });
});

describe('operation fences on storage: hostile input, bounds, expiry', () => {
  it('names are parsed strictly; the record is strict and checked', () => {
    const name = fenceFileName(OP, 1700000000000);
    expect(parseFenceName(name)).toEqual({ name, operationId: OP, fencedMs: 1700000000000 });
    for (const bad of [
      `fence_${OP}`,
      `fence_${OP}_`,
      `fence_${OP}_12x`,
      `fence_${OP.toUpperCase()}_1`,
      `fence_${OP}_1.tx-h1-p2-t3-abcd`,
      `fence_../${OP}_1`,
      `xfence_${OP}_1`,
      `fence_${OP}_1234567890123456`,
    ])
      expect(parseFenceName(bad)).toBeUndefined();
    const record = { domainId: DOMAIN_ID, operationId: OP, fencedMs: 5, hostId: 3 };
    expect(decodeFenceRecord(encodeFenceRecord(record), 'f')).toEqual(record);
    const text = encodeFenceRecord(record).toString();
    expect(() => decodeFenceRecord(Buffer.from(text.replace('HOST_ID=3', 'HOST_ID=x')), 'f')).toThrow(); // checksum
    expect(() => decodeFenceRecord(Buffer.from(text.slice(0, 40)), 'f')).toThrow(/torn|checksum/);
    expect(() => decodeFenceRecord(Buffer.from('RECORD=sdmesh-volume\n'), 'f')).toThrow(/not an sdmesh/);
    expect(() => decodeFenceRecord(Buffer.alloc(8192, 0x41), 'f')).toThrow();
  });

  it('a torn fence (a crash mid-write) still fences, and a retried FenceOperation rewrites it whole', async () => {
    const tx = metadataTx(versionedLease().provider());
    await format(tx);
    const torn = path.join(domainPath, 'dom_md', fenceFileName(OP, Date.now()));
    await fs.writeFile(torn, 'RECORD=sdmesh-fe');
    await expect(create(tx, 1, OP)).rejects.toMatchObject({ reason: Reason.OPERATION_FENCED });
    await fence(tx);
    expect(await fenceFiles()).toEqual([path.basename(torn)]);
    expect(decodeFenceRecord(await fs.readFile(torn), 'f')).toMatchObject({ operationId: OP, domainId: DOMAIN_ID });
  });

  it('expired fences (and leftover temp files) are removed by the next fence; names that are not fences are left alone', async () => {
    const tx = new MetadataTransactions({ leases: versionedLease().provider(), registry: new Registry(), fenceRetentionMs: 60_000 });
    await format(tx);
    const domMd = path.join(domainPath, 'dom_md');
    const old = fenceFileName(OTHER_OP, Date.now() - 120_000);
    const recent = fenceFileName('a0000000-0000-4000-8000-000000000003', Date.now() - 1000);
    for (const n of [old, recent, `${old}.tx-h1-p1-t1-0000abcd`, 'fence_notes.txt']) await fs.writeFile(path.join(domMd, n), 'x');
    // An expired fence name that is a directory (hostile) cannot be unlinked: it stays, the fence is still written.
    const oldDir = fenceFileName('a0000000-0000-4000-8000-000000000004', Date.now() - 120_000);
    await fs.mkdir(path.join(domMd, oldDir));
    await fence(tx);
    const left = (await fs.readdir(domMd)).filter((n) => n.startsWith('fence_')).sort();
    expect(left).toEqual([fenceFileName(OP, Number(left.find((n) => n.includes(OP))!.split('_')[2])), recent, oldDir, 'fence_notes.txt'].sort());
  });

  it('a domain with more fence names than sdmesh ever keeps refuses creates that carry an operation id (fail-safe), not others', async () => {
    const tx = metadataTx(versionedLease().provider());
    await format(tx);
    const domMd = path.join(domainPath, 'dom_md');
    const now = Date.now();
    for (let i = 0; i <= MAX_LISTED_FENCES; i++) {
      const id = `b0000000-0000-4000-8000-${String(i).padStart(12, '0')}`;
      await fs.writeFile(path.join(domMd, fenceFileName(id, now)), '');
    }
    await expect(create(tx, 1, OP)).rejects.toMatchObject({ code: 8, reason: Reason.TOO_MANY_FENCES });
    await create(tx, 2, ''); // no operation id: nothing to check
    expect(await imagesOnStorage()).toEqual([image(2)]);
  });

  it('bad input writes nothing: a fence needs a UUID operation id', async () => {
    const tx = metadataTx(versionedLease().provider());
    await format(tx);
    await expect(fence(tx, 'not-a-uuid')).rejects.toMatchObject({ code: 3 });
    await expect(fence(tx, '')).rejects.toMatchObject({ code: 3 });
    expect(await fenceFiles()).toEqual([]);
  });
});
