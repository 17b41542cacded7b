import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import { aborted, ConfinedRoot, descriptor, newTxId, pb, Reason, scanLeaseSlots } from '@sdmesh/common';
import { SharedDirSync } from '../../services/metadata-tx/src/dir-sync';
import { DomainLeaseGroups, type HoldRecord } from '../../services/metadata-tx/src/group-commit';
import { lookAtDomainLease, parseLeader, parseLeaseWanted, parseRequestRecord } from '../../services/metadata-tx/src/lease-look';
import { InProcessDomainLeaseProvider, type DomainLeaseHold, type DomainLeaseProvider, type DomainRef } from '../../services/metadata-tx/src/leases';
import { SlotIndexes } from '../../services/metadata-tx/src/slot-index';
import { appendSlotJournal, entriesBetween, readSlotJournal } from '../../services/metadata-tx/src/slot-journal';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';

const DOMAIN: DomainRef = { id: 'c0ffee00-0000-4000-8000-000000000001', path: '/nonexistent' };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** One lease shared by several "hosts", as sanlock's: exclusive, with a version bumped on every acquire. */
class SharedLease {
  private readonly inner = new InProcessDomainLeaseProvider();
  lver = 0;
  holder = '';
  /** The lease version a refused try asked for last (as sanlock's request record: the version after the one held). */
  requested = 0;
  /** Called when a try is refused, after the request is recorded (tests log it). */
  onRefused?: (host: string) => void;

  providerFor(host: string, polled = false): DomainLeaseProvider {
    const inner = this.inner;
    const provider: DomainLeaseProvider = {
      tryVolumeLease: inner.tryVolumeLease.bind(inner),
      formatLeaseSlot: inner.formatLeaseSlot.bind(inner),
      formatDomainLeases: inner.formatDomainLeases.bind(inner),
      withDomainLease: (domain, op, fn, signal) =>
        this.inner.withDomainLease(
          domain,
          op,
          async () => {
            // The holder's own check that nobody else holds it, independent of the recorded intervals.
            if (this.holder) throw new Error(`${host} got the lease while ${this.holder} holds it`);
            this.holder = host;
            try {
              return await fn({ lver: ++this.lver });
            } finally {
              this.holder = '';
            }
          },
          signal,
        ),
    };
    if (polled) {
      provider.tryDomainLease = (domain, op, fn, signal) => {
        if (this.holder) {
          this.requested = this.lver + 1;
          this.onRefused?.(host);
          return Promise.reject(aborted(`held by ${this.holder}`, Reason.LEASE_HELD));
        }
        return provider.withDomainLease(domain, op, fn, signal);
      };
    }
    return provider;
  }
}

describe('group commit of metadata transactions (DomainLeaseGroups)', () => {
  it.each(['waited for', 'polled'])(
    'three hosts run 30 transactions each, lease %s: all done in fewer holds, holds of different hosts never overlap, each host served',
    async (how) => {
      const lease = new SharedLease();
      const holds: (HoldRecord & { host: string })[] = [];
      const hosts = ['h1', 'h2', 'h3'].map(
        (host) =>
          [
            host,
            new DomainLeaseGroups(lease.providerFor(host, how === 'polled'), { maxBatch: 8, soloBatch: 16, onHold: (h) => holds.push({ ...h, host }) }),
          ] as const,
      );
      const ran: string[] = [];
      const results = await Promise.all(
        hosts.flatMap(([host, groups]) =>
          Array.from({ length: 30 }, (_, i) =>
            groups.run(DOMAIN, `${host}-${i}`, async (hold) => {
              expect(lease.holder).toBe(host);
              ran.push(`${host}-${i}`);
              await sleep(1);
              return { host, i, serial: hold.serial };
            }),
          ),
        ),
      );
      expect(results).toHaveLength(90);
      expect(new Set(ran).size).toBe(90);
      await sleep(50); // the last holds linger, then end
      expect(holds.reduce((n, h) => n + h.transactions, 0)).toBe(90);
      expect(holds.length).toBeLessThan(90);
      for (const h of holds) expect(h.transactions).toBeLessThanOrEqual(h.solo ? 16 : 8);
      for (const [host] of hosts) expect(holds.some((h) => h.host === host)).toBe(true);
      const overlaps = holds.filter((x, i) => holds.some((y, j) => j > i && x.host !== y.host && x.acquiredAt < y.releasedAt && y.acquiredAt < x.releasedAt));
      expect(overlaps).toEqual([]);
    },
  );

  it('pipelining: keyed transactions overlap once detached; one sharing a key, or one without keys, waits; the hold ends after all', async () => {
    const holds: HoldRecord[] = [];
    const groups = new DomainLeaseGroups(new InProcessDomainLeaseProvider(), { lingerMs: 5, onHold: (h) => holds.push(h) });
    const log: string[] = [];
    let lastEnd = 0;
    const step = (name: string, keys?: string[]) =>
      groups.run(
        DOMAIN,
        name,
        async (hold) => {
          log.push(`${name} start`);
          hold.detach();
          await sleep(30);
          log.push(`${name} end`);
          lastEnd = Date.now();
        },
        undefined,
        keys,
      );
    await Promise.all([step('a', ['x']), step('b', ['y']), step('c', ['x', 'z']), step('d')]);
    const at = (e: string) => log.indexOf(e);
    expect(at('b start')).toBeLessThan(at('a end'));
    expect(at('c start')).toBeGreaterThan(at('a end'));
    expect(at('d start')).toBeGreaterThan(Math.max(at('b end'), at('c end')));
    expect(at('d end')).toBe(at('d start') + 1); // without keys, detach() does not let anything in
    await sleep(20);
    expect(holds).toHaveLength(1);
    expect(holds[0]!.releasedAt).toBeGreaterThanOrEqual(lastEnd);
  });

  it('a failing transaction is reported to its caller only; the others of the hold commit', async () => {
    const groups = new DomainLeaseGroups(new InProcessDomainLeaseProvider(), { lingerMs: 5 });
    const outcomes = await Promise.allSettled(
      [0, 1, 2, 3].map((i) =>
        groups.run(DOMAIN, `op-${i}`, async (hold) => {
          if (i === 1) throw new Error('boom');
          return hold.serial;
        }),
      ),
    );
    expect(outcomes.map((o) => o.status)).toEqual(['fulfilled', 'rejected', 'fulfilled', 'fulfilled']);
    // All four queued before the first hold started: one hold.
    expect(new Set(outcomes.filter((o) => o.status === 'fulfilled').map((o) => (o as PromiseFulfilledResult<number>).value))).toEqual(new Set([1]));
  });

  it('a transaction cancelled while queued never runs; the hold goes on', async () => {
    const groups = new DomainLeaseGroups(new InProcessDomainLeaseProvider());
    const abort = new AbortController();
    let cancelledRan = false;
    const first = groups.run(DOMAIN, 'first', async () => {
      abort.abort(new Error('cancelled by the caller'));
      await sleep(5);
      return 'first';
    });
    const cancelled = groups.run(
      DOMAIN,
      'cancelled',
      async () => {
        cancelledRan = true;
      },
      abort.signal,
    );
    const third = groups.run(DOMAIN, 'third', async () => 'third');
    await expect(cancelled).rejects.toThrow('cancelled by the caller');
    expect(await Promise.all([first, third])).toEqual(['first', 'third']);
    expect(cancelledRan).toBe(false);
  });
});

describe('slot index kept across holds only with a continuous fencing token, or caught up from the slot journal', () => {
  let root: string;
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-slot-index-');
  });
  afterAll(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  it('the next hold reuses the index iff its lver is the last + 1; a gap (another holder) rescans and sees its slots', async () => {
    const domainPath = path.join(root, 'd');
    const domainId = 'c0ffee00-0000-4000-8000-000000000002';
    const mine = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry() });
    await mine.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId, name: 'd', path: domainPath, maxVolumes: 20 }));
    const create = (tx: MetadataTransactions, n: number) =>
      tx.createVolume(
        pb.CreateVolumeRequest.fromPartial({
          domainPath,
          imageId: `d0000000-0000-4000-8000-00000000000${n}`,
          volumeId: `e0000000-0000-4000-8000-00000000000${n}`,
          capacityBytes: 1 << 20,
        }),
      );
    const indexes = new SlotIndexes();
    const hold = (lver: number, serial: number): DomainLeaseHold => (indexes.holdStarted(domainId, domainPath, { lver }, serial), { lver });
    hold(10, 1);
    const first = await indexes.get(domainId, domainPath, 1, 20, 3);
    expect(first.allocate()).toBe(3);
    hold(11, 2);
    expect(await indexes.get(domainId, domainPath, 2, 20, 3)).toBe(first);
    // Another writer creates a volume (slot 3 is free on disk: the index's 3 was never used): a gap in lver.
    await create(mine, 1);
    hold(13, 3);
    const rebuilt = await indexes.get(domainId, domainPath, 3, 20, 3);
    expect(rebuilt).not.toBe(first);
    expect(rebuilt.committedImageOf('e0000000-0000-4000-8000-000000000001')).toBe('d0000000-0000-4000-8000-000000000001');
    expect(rebuilt.allocate()).toBe(4);
    // No token (the in-process provider): never kept across holds.
    hold(0, 4);
    expect(await indexes.get(domainId, domainPath, 4, 20, 3)).not.toBe(rebuilt);
  });
  it('with a continuous fencing token the index lives across holds, and a delete makes it forget: a deleted volume id can be created again', async () => {
    const domainPath = path.join(root, 'd2');
    const tx = new MetadataTransactions({ leases: new SharedLease().providerFor('h1'), registry: new Registry() });
    await tx.formatDomain(
      pb.FormatDomainRequest.fromPartial({ domainId: 'c0ffee00-0000-4000-8000-000000000003', name: 'd2', path: domainPath, maxVolumes: 20 }),
    );
    const volumeId = 'e0000000-0000-4000-8000-000000000009';
    const create = (imageId: string) => tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId, volumeId, capacityBytes: 1 << 20 }));
    const first = await create('d0000000-0000-4000-8000-00000000000a');
    await expect(create('d0000000-0000-4000-8000-00000000000b')).rejects.toMatchObject({ reason: 'VOLUME_EXISTS' });
    await tx.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: first.imageId, operationId: 'del' }));
    const again = await create('d0000000-0000-4000-8000-00000000000b');
    expect(again.id).toBe(volumeId);
    expect(again.lease!.offset).not.toBe(first.lease!.offset); // the deleted one keeps its slot until the GC
    await sleep(50); // the last hold ends (and writes its slot journal entry)
  });

  // The slot journal (slot-journal.ts): the index caught up from what the holds in between added.
  it('entries read back only when intact and of this domain; a run of versions only if each is there once', async () => {
    const d = path.join(root, 'file');
    await fs.mkdir(path.join(d, 'dom_md'), { recursive: true });
    const id = 'c0ffee00-0000-4000-8000-000000000005';
    const volume: [string, string] = ['e0000000-0000-4000-8000-0000000000a1', 'd0000000-0000-4000-8000-0000000000a1'];
    for (let lver = 3; lver <= 11; lver++) await appendSlotJournal(d, id, { lver, slots: [lver + 100], volumes: lver === 5 ? [volume] : [] });
    const entries = await readSlotJournal(d, id);
    expect(entries.map((e) => e.lver)).toEqual([4, 5, 6, 7, 8, 9, 10, 11]); // the last 8
    expect(entriesBetween(entries, 5, 7)).toEqual([
      { lver: 5, slots: [105], volumes: [volume] },
      { lver: 6, slots: [106], volumes: [] },
      { lver: 7, slots: [107], volumes: [] },
    ]);
    expect(entriesBetween(entries, 3, 5)).toBeUndefined();
    expect(entriesBetween(entries, 10, 12)).toBeUndefined();
    expect(await readSlotJournal(d, 'c0ffee00-0000-4000-8000-000000000006')).toEqual([]);
    const file = path.join(d, 'dom_md', 'slot-journal');
    const intact = await fs.readFile(file, 'utf8');
    await fs.writeFile(file, intact.replace('105', '106')); // not what its checksum says
    expect(await readSlotJournal(d, id)).toEqual([]);
    await fs.writeFile(file, intact.slice(0, intact.length / 2)); // torn
    expect(await readSlotJournal(d, id)).toEqual([]);
    await fs.rm(file);
    expect(await readSlotJournal(d, id)).toEqual([]);
  });

  it('two hosts taking turns: each catches its index up from the journal instead of scanning; a hold without an entry (a delete, a failed create) makes the next one scan', async () => {
    const domainPath = path.join(root, 'turns');
    const lease = new SharedLease();
    const registries = [new Registry(), new Registry()];
    const providers = ['h1', 'h2'].map((host) => lease.providerFor(host));
    const [h1, h2] = providers.map((leases, i) => new MetadataTransactions({ leases, registry: registries[i]! }));
    await h1!.formatDomain(
      pb.FormatDomainRequest.fromPartial({ domainId: 'c0ffee00-0000-4000-8000-000000000007', name: 'd', path: domainPath, maxVolumes: 20 }),
    );
    const builds = async (i: number) =>
      Object.fromEntries(
        (await registries[i]!.getSingleMetric('sdmesh_metadata_tx_slot_index_builds_total')!.get()).values.map((v) => [v.labels.how, v.value]),
      );
    const create = (tx: MetadataTransactions, n: number, volume = n) =>
      tx.createVolume(
        pb.CreateVolumeRequest.fromPartial({
          domainPath,
          imageId: `d0000000-0000-4000-8000-0000000000${10 + n}`,
          volumeId: `e0000000-0000-4000-8000-0000000000${10 + volume}`,
          capacityBytes: 1 << 20,
        }),
      );
    const slots = [(await create(h1!, 1)).lease!.offset, (await create(h2!, 2)).lease!.offset, (await create(h1!, 3)).lease!.offset];
    expect(await builds(0)).toEqual({ scan: 1, journal: 1 });
    // h2 learned h1's committed volume 3 from the journal: the same id again is refused.
    await expect(create(h2!, 4, 3)).rejects.toMatchObject({ reason: 'VOLUME_EXISTS' });
    expect(await builds(1)).toEqual({ scan: 1, journal: 1 });
    // h2 again right after its own hold: nothing to learn. Then h1, two holds behind: both entries.
    slots.push((await create(h2!, 5)).lease!.offset, (await create(h1!, 6)).lease!.offset);
    expect(await builds(1)).toEqual({ scan: 1, journal: 1 });
    expect(await builds(0)).toEqual({ scan: 1, journal: 2 });
    // A delete changes committed ids: its hold writes no entry, so the next holder scans.
    await h1!.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: 'd0000000-0000-4000-8000-000000000011', operationId: 'del' }));
    slots.push((await create(h2!, 7)).lease!.offset);
    expect(await builds(1)).toEqual({ scan: 2, journal: 1 });
    expect(new Set(slots).size).toBe(6);
    const { volumes } = await h1!.listVolumes(pb.ListVolumesRequest.fromPartial({ domainPath }));
    expect(volumes.map((v) => v.lease!.offset).sort()).toEqual(slots.filter((_, i) => i !== 0).sort());
    // A create that fails after taking its slot (its lease area not written): no entry either.
    providers[0]!.formatLeaseSlot = () => Promise.reject(new Error('lease area not written'));
    await expect(create(h1!, 8)).rejects.toThrow('lease area not written');
    await create(h2!, 9);
    expect(await builds(1)).toEqual({ scan: 3, journal: 1 });
    await sleep(50); // the last hold ends (and writes its journal entry)
  });
});

describe('wider hold bounds only while no other holder comes between two holds of this process', () => {
  it('lver = last + 1 → up to soloBatch per hold; after another holder took the lease, the normal bound again', async () => {
    const lease = new SharedLease();
    const holds: HoldRecord[] = [];
    const groups = new DomainLeaseGroups(lease.providerFor('h1'), { maxBatch: 2, soloBatch: 6, yieldMs: 1, onHold: (h) => holds.push(h) });
    const runMany = (n: number) => Promise.all(Array.from({ length: n }, (_, i) => groups.run(DOMAIN, `op-${i}`, () => sleep(1))));
    await runMany(20);
    await sleep(30); // the last hold lingers, then ends
    expect(holds.reduce((n, h) => n + h.transactions, 0)).toBe(20);
    // The first hold has no earlier one to compare with: the normal bound.
    expect(holds[0]).toMatchObject({ solo: false, transactions: 2 });
    for (const h of holds.slice(1)) expect(h).toMatchObject({ solo: true });
    for (const h of holds) expect(h.transactions).toBeLessThanOrEqual(h.solo ? 6 : 2);
    expect(holds.some((h) => h.transactions > 2)).toBe(true);

    // Another holder takes the lease between two holds: the next hold is bounded as usual.
    await lease.providerFor('h2').withDomainLease(DOMAIN, 'other', async () => undefined);
    holds.length = 0;
    await runMany(8);
    await sleep(30);
    expect(holds[0]).toMatchObject({ solo: false, transactions: 2 });
    expect(holds.slice(1).every((h) => h.solo)).toBe(true);
  });

  /**
   * h1 runs a stream of transactions (8 queued at all times) until told to stop; once its solo
   * hold has run `soloFor` transactions, h2 (polling, its refused try recording a request as
   * sanlock does) runs one. The order of everything in `log`.
   */
  async function soloHolderAndLateWaiter(opts: { soloBatch: number; leaseWanted: boolean; soloFor: number }) {
    const lease = new SharedLease();
    const log: string[] = [];
    lease.onRefused = (host) => log.push(`${host} requested`);
    const holds: (HoldRecord & { host: string })[] = [];
    const leaseWanted = opts.leaseWanted ? async (_d: DomainRef, lver: number) => lease.requested >= lver : false;
    const groupsOf = (host: string) =>
      new DomainLeaseGroups(lease.providerFor(host, true), {
        maxBatch: 4,
        maxHoldMs: 60_000,
        soloBatch: opts.soloBatch,
        soloHoldMs: 60_000,
        yieldMs: 5,
        pollMs: 1,
        lookAtLease: false,
        leaseWanted,
        onHold: (h) => holds.push({ ...h, host }),
      });
    const h1 = groupsOf('h1');
    const h2 = groupsOf('h2');
    let stop = false;
    const stream = async () => {
      for (let i = 0; !stop; i++)
        await h1.run(DOMAIN, `h1-${i}`, async () => {
          log.push('h1');
          await sleep(1); // as storage I/O: timers (the test's own loop) run meanwhile
        });
    };
    const streams = Promise.all(Array.from({ length: 8 }, stream));
    // The first hold (nothing to compare its lver with) ends at the normal bound; then the solo hold.
    while (!(holds.length >= 1 && log.length >= holds[0]!.transactions + opts.soloFor)) await sleep(1);
    await h2.run(DOMAIN, 'h2', async () => void log.push('h2'));
    stop = true;
    await streams;
    await sleep(20);
    const soloHold = holds.find((h) => h.host === 'h1' && h.solo)!;
    const afterRequest = log.slice(log.indexOf('h2 requested'), log.indexOf('h2')).filter((e) => e === 'h1').length;
    return { soloHold, afterRequest, log };
  }

  it("a host that starts waiting during another's solo hold gets the lease after at most one normal batch of it (the waiter's request, read between batches)", async () => {
    const { soloHold, afterRequest, log } = await soloHolderAndLateWaiter({ soloBatch: 100_000, leaseWanted: true, soloFor: 10 });
    expect(log.indexOf('h2 requested')).toBeGreaterThan(0);
    expect(afterRequest).toBeLessThanOrEqual(4);
    expect(soloHold).toMatchObject({ solo: true, requested: true, ended: 'bound' });
    // It ran more than a normal batch before the request: solo bounds until then.
    expect(soloHold.transactions).toBeGreaterThan(4 + 4);
  });

  it('without the request check the same waiter waits for the whole solo hold (the case above is what makes the difference)', async () => {
    const { soloHold, afterRequest } = await soloHolderAndLateWaiter({ soloBatch: 60, leaseWanted: false, soloFor: 10 });
    expect(soloHold).toMatchObject({ solo: true, requested: false, transactions: 60 });
    expect(afterRequest).toBeGreaterThan(4);
  });

  it('a host alone keeps the solo bounds: asked once per normal batch, with the version of its hold, it is told nobody wants the lease', async () => {
    const lease = new SharedLease();
    const holds: HoldRecord[] = [];
    const asked: number[] = [];
    const leaseWanted = async (_d: DomainRef, lver: number) => {
      asked.push(lver);
      return false;
    };
    const groups = new DomainLeaseGroups(lease.providerFor('h1'), { maxBatch: 2, soloBatch: 12, yieldMs: 1, leaseWanted, onHold: (h) => holds.push(h) });
    await Promise.all(Array.from({ length: 40 }, (_, i) => groups.run(DOMAIN, `op-${i}`, () => sleep(1))));
    await sleep(30);
    expect(holds[0]).toMatchObject({ solo: false, transactions: 2 });
    expect(holds.some((h) => h.solo && h.transactions === 12)).toBe(true);
    expect(holds.every((h) => !h.requested)).toBe(true);
    expect(asked.length).toBeGreaterThan(0);
    // Only solo holds ask, at most once per normal batch (2 transactions) each, with their own lver (2, 3, ...).
    expect(asked.length).toBeLessThanOrEqual(holds.filter((h) => h.solo).reduce((n, h) => n + Math.floor(h.transactions / 2), 0));
    expect(asked.every((v) => v >= 2 && v <= lease.lver)).toBe(true);
  });

  it('a provider without lver (in-process) never widens the bounds', async () => {
    const holds: HoldRecord[] = [];
    const groups = new DomainLeaseGroups(new InProcessDomainLeaseProvider(), { maxBatch: 2, soloBatch: 6, yieldMs: 1, onHold: (h) => holds.push(h) });
    await Promise.all(Array.from({ length: 10 }, (_, i) => groups.run(DOMAIN, `op-${i}`, () => sleep(1))));
    await sleep(30);
    expect(holds.map((h) => [h.solo, h.transactions])).toEqual(Array.from({ length: 5 }, () => [false, 2]));
  });
});

describe("sanlock's request record as the holder reads it (hostile bytes: anything unexpected is 'not known')", () => {
  /** A leader of resource SDM held at lver (sector size given), followed by a request record for requested. */
  function area(o: { lver: number; requested?: number; sectorSize?: number; free?: boolean; magic?: number; version?: number }): Buffer {
    const sectorSize = o.sectorSize ?? 512;
    const b = Buffer.alloc(Math.max(4096, sectorSize * 2));
    b.writeUInt32LE(0x06152010, 0);
    b.writeUInt32LE(sectorSize, 12);
    b.writeBigUInt64LE(2000n, 16);
    b.writeBigUInt64LE(1n, 32);
    b.writeBigUInt64LE(BigInt(o.lver), 48);
    b.write('SDM', 104, 'latin1');
    b.writeBigUInt64LE(o.free ? 0n : 12345n, 152);
    if (o.requested !== undefined) {
      b.writeUInt32LE(o.magic ?? 0x08292011, sectorSize);
      b.writeUInt32LE(o.version ?? 0x00010001, sectorSize + 4);
      b.writeBigUInt64LE(BigInt(o.requested), sectorSize + 8);
    }
    return b;
  }

  it('a request for this version or the next means wanted; an older one, none, or a foreign or malformed one does not', () => {
    expect(parseLeaseWanted(area({ lver: 7, requested: 8 }), 'SDM', 7)).toBe(true);
    expect(parseLeaseWanted(area({ lver: 7, requested: 7 }), 'SDM', 7)).toBe(true);
    expect(parseLeaseWanted(area({ lver: 7, requested: 6 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 0 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, magic: 0x1234 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, version: 0x00020000 }), 'SDM', 7)).toBe(false);
    // Not the lease as this holder took it: another version, free, another resource, another sector size.
    expect(parseLeaseWanted(area({ lver: 9, requested: 10 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, free: true }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8 }), 'GC', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, sectorSize: 1000 }), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8 }).subarray(0, 600), 'SDM', 7)).toBe(false);
    expect(parseLeaseWanted(Buffer.alloc(4096), 'SDM', 7)).toBe(false);
    // 4096-byte sectors: the request record is the second 4 KiB.
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, sectorSize: 4096 }), 'SDM', 7)).toBe(true);
    expect(parseLeaseWanted(area({ lver: 7, requested: 8, sectorSize: 4096 }).subarray(0, 4096), 'SDM', 7)).toBe(false);
  });

  it('parseRequestRecord: the requested version, or nothing for bad magic, a major version it does not know, or a version beyond safe integers', () => {
    const rr = area({ lver: 1, requested: 42 }).subarray(512, 1024);
    expect(parseRequestRecord(rr)).toBe(42);
    expect(parseRequestRecord(rr.subarray(0, 16))).toBeUndefined();
    const huge = Buffer.from(rr);
    huge.writeBigUInt64LE(2n ** 63n, 8);
    expect(parseRequestRecord(huge)).toBeUndefined();
  });
});

describe('SharedDirSync: directory fsyncs shared by the creates in flight', () => {
  const flush = () => new Promise((resolve) => setImmediate(resolve));

  it('each caller waits for an fsync that started after its call; callers during a running fsync share the next one', async () => {
    const started: { dir: string; resolve: () => void }[] = [];
    const fsyncOf = (dir: string) => () => new Promise<void>((resolve) => started.push({ dir, resolve }));
    const sync = new SharedDirSync();
    const done: string[] = [];
    const call = (name: string, dir = '/d/images') => sync.sync(dir, fsyncOf(dir)).then(() => void done.push(name));
    const a = call('a');
    await flush();
    expect(started).toHaveLength(1);
    const b = call('b');
    const c = call('c');
    const other = call('other', '/e/images'); // another directory: its own fsync at once
    await flush();
    expect(started.map((s) => s.dir)).toEqual(['/d/images', '/e/images']);
    started[1]!.resolve();
    started[0]!.resolve();
    await Promise.all([a, other]);
    await flush();
    expect(done.sort()).toEqual(['a', 'other']);
    // b and c did not take the fsync that was running when they called: one more, shared.
    expect(started).toHaveLength(3);
    started[2]!.resolve();
    await Promise.all([b, c]);
    expect(done.sort()).toEqual(['a', 'b', 'c', 'other']);
    expect(sync.fsyncs).toBe(3);
    // Nothing running: a new caller starts its own.
    const d = call('d');
    await flush();
    expect(started).toHaveLength(4);
    started[3]!.resolve();
    await d;
  });

  it("an fsync's error reaches every caller that waited for it; the next call starts a new fsync", async () => {
    const sync = new SharedDirSync();
    let fail = true;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const fsync = async () => {
      await gate;
      if (fail) throw new Error('EIO');
    };
    const first = sync.sync('/d', fsync);
    const second = sync.sync('/d', fsync);
    const third = sync.sync('/d', fsync);
    release();
    await expect(first).rejects.toThrow('EIO');
    await expect(second).rejects.toThrow('EIO');
    await expect(third).rejects.toThrow('EIO');
    fail = false;
    await expect(sync.sync('/d', fsync)).resolves.toBeUndefined();
    expect(sync.fsyncs).toBe(3);
  });
});

describe('a create of a new image is durable before it answers', () => {
  let root: string;
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-create-durable-');
  });
  afterAll(async () => {
    jest.restoreAllMocks();
    await fs.rm(root, { recursive: true, force: true });
  });

  it('record (written in place, no temp file), data and marker directory are fsynced before the commit rename; images/ after it', async () => {
    const domainPath = path.join(root, 'd');
    const tx = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry() });
    await tx.formatDomain(
      pb.FormatDomainRequest.fromPartial({ domainId: 'c0ffee00-0000-4000-8000-000000000004', name: 'd', path: domainPath, maxVolumes: 20 }),
    );
    const events: string[] = [];
    // images/_tx_<txid>_<image> as images/_tx_<image>
    const name = (p: string) => path.relative(domainPath, p).replace(/_tx_[^/]+_([0-9a-f-]{36})/, '_tx_$1');
    const proto = ConfinedRoot.prototype;
    const { createFileDescriptor, fsyncDir, rename, writeNewFile } = proto;
    const { sync, close, syncAndClose } = descriptor;
    // The files a create writes, by their open descriptors.
    const created = new Map<number, string>();
    jest.spyOn(proto, 'createFileDescriptor').mockImplementation(async function (this: ConfinedRoot, target, kind, data) {
      const fd = await createFileDescriptor.call(this, target, kind, data);
      events.push(`create ${name(target)}`);
      created.set(fd, name(target));
      return fd;
    });
    jest.spyOn(descriptor, 'sync').mockImplementation(async (fd) => {
      await sync(fd);
      if (created.has(fd)) events.push(`fsync ${created.get(fd)}`);
    });
    jest.spyOn(descriptor, 'close').mockImplementation(async (fd) => {
      created.delete(fd);
      await close(fd);
    });
    jest.spyOn(descriptor, 'syncAndClose').mockImplementation(async (fd) => {
      const file = created.get(fd);
      created.delete(fd);
      await syncAndClose(fd);
      if (file) events.push(`fsync ${file}`);
    });
    // A file written whole in one confined step (created, written, fsynced and closed when it resolves).
    jest.spyOn(proto, 'writeNewFile').mockImplementation(async function (this: ConfinedRoot, target, kind, content) {
      events.push(`create ${name(target)}`);
      const bytes = await writeNewFile.call(this, target, kind, content);
      events.push(`fsync ${name(target)}`);
      return bytes;
    });
    jest.spyOn(proto, 'fsyncDir').mockImplementation(async function (this: ConfinedRoot, dir) {
      await fsyncDir.call(this, dir);
      events.push(`fsync ${name(dir)}/`);
    });
    jest.spyOn(proto, 'rename').mockImplementation(async function (this: ConfinedRoot, from, to) {
      events.push(`rename ${name(from)}`);
      return rename.call(this, from, to);
    });
    const imageId = 'd0000000-0000-4000-8000-0000000000c1';
    const volumeId = 'e0000000-0000-4000-8000-0000000000c1';
    await Promise.all([
      tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId, volumeId, capacityBytes: 1 << 20 })).then(() => events.push('answered')),
      // Another create in flight beside it: fsyncs of images/ may be shared, never skipped.
      tx.createVolume(
        pb.CreateVolumeRequest.fromPartial({
          domainPath,
          imageId: 'd0000000-0000-4000-8000-0000000000c2',
          volumeId: 'e0000000-0000-4000-8000-0000000000c2',
          capacityBytes: 1 << 20,
        }),
      ),
    ]);
    jest.restoreAllMocks();
    const at = (e: string) => {
      const i = events.indexOf(e);
      expect({ e, found: i >= 0 }).toEqual({ e, found: true });
      return i;
    };
    const txDir = `images/_tx_${imageId}`;
    const commit = at(`rename ${txDir}`);
    expect(events.filter((e) => e.startsWith('create') && e.includes('.tx-'))).toEqual([]);
    expect(at(`create ${txDir}/${volumeId}.meta`)).toBeLessThan(at(`create ${txDir}/${volumeId}`));
    for (const synced of [`fsync ${txDir}/${volumeId}.meta`, `fsync ${txDir}/${volumeId}`, `fsync ${txDir}/`]) expect(at(synced)).toBeLessThan(commit);
    const answered = at('answered');
    expect(events.slice(commit, answered).includes('fsync images/')).toBe(true);
    expect(events.slice(0, at(`create ${txDir}/${volumeId}.meta`)).includes('fsync images/')).toBe(true); // the marker
    expect((await tx.getVolume({ domainPath, imageId, volumeId })).qemuInfo?.virtualSize).toBe(1 << 20);
  });
});

describe('the slot scan over more images than it reads at once', () => {
  it('sees every slot and committed volume id; an unreadable committed record still fails it, a torn uncommitted one does not', async () => {
    const root = await fs.mkdtemp('/var/tmp/sdmesh-slot-scan-');
    try {
      const domainPath = path.join(root, 'd');
      const tx = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry() });
      await tx.formatDomain(
        pb.FormatDomainRequest.fromPartial({ domainId: 'c0ffee00-0000-4000-8000-000000000005', name: 'd', path: domainPath, maxVolumes: 100 }),
      );
      const id = (prefix: string, n: number) => `${prefix}0000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
      const created = await Promise.all(
        Array.from({ length: 40 }, (_, n) =>
          tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: id('d', n), volumeId: id('e', n), capacityBytes: 1 << 20 })),
        ),
      );
      const torn = path.join(domainPath, 'images', `_tx_${newTxId(1)}_${id('d', 99)}`);
      await fs.mkdir(torn);
      await fs.writeFile(path.join(torn, `${id('e', 99)}.meta`), 'RECORD=sdmesh-vol');
      const scan = await scanLeaseSlots(domainPath);
      expect([...scan.usedSlots].sort((a, b) => a - b)).toEqual(created.map((v) => v.lease!.offset / (1 << 20)).sort((a, b) => a - b));
      expect(scan.usedSlots.size).toBe(40);
      expect(new Map([...scan.committedVolumeIds].map(([v, { imageId }]) => [v, imageId]))).toEqual(new Map(created.map((v) => [v.id, v.imageId])));
      await fs.writeFile(path.join(domainPath, 'images', id('d', 31), `${id('e', 31)}.meta`), 'RECORD=sdmesh-volume\nFORMAT_VERSION=1\n');
      await expect(scanLeaseSlots(domainPath)).rejects.toMatchObject({ reason: 'TORN_RECORD' });
    } finally {
      await fs.rm(root, { recursive: true, force: true });
    }
  });
});

describe('waiting for the lease: looks at it instead of asking for it (lease-look.ts)', () => {
  /** A sanlock leader record: magic, owner, lver, resource name, timestamp (0 = free). */
  const leader = (o: { owner: number; lver: number; name: string; timestamp: number; magic?: number }) => {
    const b = Buffer.alloc(512);
    b.writeUInt32LE(o.magic ?? 0x06152010, 0);
    b.writeBigUInt64LE(BigInt(o.owner), 32);
    b.writeBigUInt64LE(BigInt(o.lver), 48);
    b.write(o.name, 104, 'latin1');
    b.writeBigUInt64LE(BigInt(o.timestamp), 152);
    return b;
  };

  it("reads the leader record's owner, version and whether it is free; anything else is no answer", () => {
    expect(parseLeader(leader({ owner: 7, lver: 42, name: 'SDM', timestamp: 1234 }), 'SDM')).toEqual({ free: false, lver: 42, ownerHostId: 7 });
    expect(parseLeader(leader({ owner: 7, lver: 43, name: 'SDM', timestamp: 0 }), 'SDM')).toEqual({ free: true, lver: 43, ownerHostId: 0 });
    expect(parseLeader(leader({ owner: 7, lver: 43, name: 'GC', timestamp: 0 }), 'SDM')).toBeUndefined();
    expect(parseLeader(leader({ owner: 7, lver: 43, name: 'SDMX', timestamp: 0 }), 'SDM')).toBeUndefined();
    expect(parseLeader(leader({ owner: 7, lver: 43, name: 'SDM', timestamp: 0, magic: 0 }), 'SDM')).toBeUndefined();
    expect(parseLeader(Buffer.alloc(100), 'SDM')).toBeUndefined();
  });

  it('no lease area to look at (not a sanlock lease): no answer, the waiter polls', async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), 'lease-look-'));
    try {
      expect(await lookAtDomainLease({ id: DOMAIN.id, path: root })).toBeUndefined();
      await fs.mkdir(path.join(root, 'dom_md'));
      await fs.writeFile(path.join(root, 'dom_md', 'leases'), Buffer.alloc(1 << 20));
      expect(await lookAtDomainLease({ id: DOMAIN.id, path: root })).toBeUndefined();
    } finally {
      await fs.rm(root, { recursive: true, force: true });
    }
  });

  it('a look that never answers (storage stalled) or fails counts as none: the waiter still gets the lease by polling', async () => {
    const lease = new SharedLease();
    let release!: () => void;
    const holder = new DomainLeaseGroups(lease.providerFor('h1', true)).run(DOMAIN, 'h1', () => new Promise<void>((resolve) => (release = resolve)));
    await sleep(5);
    const hung = new DomainLeaseGroups(lease.providerFor('h2', true), { hostId: 2, pollMs: 5, lookAtLease: () => new Promise(() => undefined) });
    const failing = new DomainLeaseGroups(lease.providerFor('h3', true), { hostId: 3, pollMs: 5, lookAtLease: () => Promise.reject(new Error('EIO')) });
    const waiters = [hung.run(DOMAIN, 'h2', async () => 'h2'), failing.run(DOMAIN, 'h3', async () => 'h3')];
    await sleep(30);
    release();
    expect(await Promise.all(waiters)).toEqual(['h2', 'h3']);
    await holder;
  });

  it('waiters that see the release take turns: one tries, the others see it taken and do not (no two acquires at once)', async () => {
    const lease = new SharedLease();
    const look = async () => ({ free: !lease.holder, lver: lease.lver, ownerHostId: lease.holder ? 1 : 0 });
    const tries: { host: string; held: boolean }[] = [];
    const groupsOf = (host: string, hostId: number) => {
      const provider = lease.providerFor(host, true);
      const tryLease = provider.tryDomainLease!;
      provider.tryDomainLease = (d, op, fn, signal) => {
        tries.push({ host, held: !!lease.holder });
        return tryLease(d, op, fn, signal);
      };
      // The poll alone would take minutes: every try after the first comes from a look.
      return new DomainLeaseGroups(provider, { hostId, pollMs: 60_000, lookAtLease: look });
    };
    let release!: () => void;
    const h1 = groupsOf('h1', 1).run(DOMAIN, 'h1', () => new Promise<void>((resolve) => (release = resolve)));
    await sleep(5);
    const waiters = [groupsOf('h2', 2), groupsOf('h3', 3), groupsOf('h4', 4)].map((g, i) => g.run(DOMAIN, `w${i}`, () => sleep(20)));
    await sleep(30);
    expect(tries.filter((t) => t.host !== 'h1').map((t) => t.held)).toEqual([true, true, true]);
    release();
    await Promise.all([h1, ...waiters]);
    // After the first refusals, every try found the lease free: waiters never raced for it.
    expect(tries.slice(4).map((t) => t.held)).toEqual([false, false, false]);
  });
});
