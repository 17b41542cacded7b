import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { aborted, pb, Reason } from '@sdmesh/common';
import { DomainLeaseGroups, type HoldRecord } from '../../services/metadata-tx/src/group-commit';
import { InProcessDomainLeaseProvider, type DomainLeaseHold, type DomainLeaseProvider, type DomainRef } from '../../services/metadata-tx/src/leases';
import { SlotIndexes } from '../../services/metadata-tx/src/slot-index';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';

const DOMAIN: DomainRef = { id: 'c0ffee00-0000-4000-8000-000000000001', path: '/nonexistent' };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** One lease shared by several "hosts", as sanlock's: exclusive, with a version bumped on every acquire. */
class SharedLease {
  private readonly inner = new InProcessDomainLeaseProvider();
  lver = 0;
  holder = '';

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
        if (this.holder) return Promise.reject(aborted(`held by ${this.holder}`, Reason.LEASE_HELD));
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
        (host) => [host, new DomainLeaseGroups(lease.providerFor(host, how === 'polled'), { maxBatch: 8, onHold: (h) => holds.push({ ...h, host }) })] as const,
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
      for (const h of holds) expect(h.transactions).toBeLessThanOrEqual(8);
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

describe('slot index kept across holds only with a continuous fencing token', () => {
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
  });
});
