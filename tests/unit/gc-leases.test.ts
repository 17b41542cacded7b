import { aborted, pb, Reason, type DomainRef, type LeaseHolder } from '@sdmesh/common';
import { VolumeLeaseGroups, type HoldVolumeGroup } from '../../services/gc/src/lease-groups';
import { sanlockLeases } from '../../services/gc/src/leases';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

describe("the gc's domain lease", () => {
  const domain: DomainRef = { id: 'lockspace', path: '/srv/domain' };
  /** A holder whose domain lease is held by another for the first `busyTries` no-wait tries. */
  function busyHolder(busyTries: number) {
    const tries: { wait: boolean | undefined }[] = [];
    const holder = {
      leaseManager: {},
      async withLease<T>(location: pb.LeaseLocation, _mode: string, _op: string, fn: (lease: pb.Lease) => Promise<T>, opts: { wait?: boolean }): Promise<T> {
        tries.push({ wait: opts.wait });
        if (tries.length <= busyTries) throw aborted(`lease "${location.resource}" is held (exclusive) by host id 2`, Reason.LEASE_HELD);
        return fn(pb.Lease.fromPartial({ location, lver: 41 + tries.length }));
      },
    };
    return { holder: holder as unknown as LeaseHolder, tries };
  }

  it('is tried without waiting until the holder lets it go (not left to the lease-manager backing off to 1 s), and gives fn its version', async () => {
    const { holder, tries } = busyHolder(3);
    const lver = await sanlockLeases(holder).withDomainLease(domain, 'op', async (lease) => lease.lver);
    expect(tries).toEqual([{ wait: false }, { wait: false }, { wait: false }, { wait: false }]);
    expect(lver).toBe(45);
  });

  it("a held-lease error from the batch itself is the batch's answer, never a reason to run it again", async () => {
    const { holder, tries } = busyHolder(0);
    let runs = 0;
    const err = await sanlockLeases(holder)
      .withDomainLease(domain, 'op', async () => {
        runs++;
        throw aborted('lease "volume-1" is held (exclusive) by host id 2', Reason.LEASE_HELD);
      })
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ reason: Reason.LEASE_HELD });
    expect(runs).toBe(1);
    expect(tries).toHaveLength(1);
  });
});

describe('volume leases taken several per sanlock command (VolumeLeaseGroups)', () => {
  const domain: DomainRef = { id: 'lockspace', path: '/srv/domain' };
  afterEach(() => jest.useRealTimers());

  /** A HoldVolumeGroup over fake leases: all or none, `heldElsewhere` refused; logs each group's hold and release. */
  function fakeHold(heldElsewhere = new Set<string>()) {
    const held = new Set<string>();
    const log: string[] = [];
    const groups: string[][] = [];
    const hold: HoldVolumeGroup = async (_d, volumes, _op, body) => {
      const ids = volumes.map((v) => v.volumeId);
      await sleep(1);
      const busy = ids.find((id) => heldElsewhere.has(id));
      if (busy) throw aborted(`lease "${busy}" is held (exclusive) by host id 9`, Reason.LEASE_HELD);
      groups.push(ids);
      for (const id of ids) held.add(id);
      log.push(`+${ids.join(',')}`);
      try {
        await body();
      } finally {
        for (const id of ids) held.delete(id);
        log.push(`-${ids.join(',')}`);
      }
    };
    return { hold, held, log, groups };
  }

  it('groups up to 8 waiting requests per acquire; each item works while its lease is held and ends after its release', async () => {
    const fake = fakeHold();
    const groups = new VolumeLeaseGroups(fake.hold, 2);
    const ended: string[] = [];
    const ids = Array.from({ length: 20 }, (_, i) => `volume-${i}`);
    await Promise.all(
      ids.map(async (id, i) => {
        await groups.withVolumeLease(domain, id, 3 + i, 'op', async () => {
          expect(fake.held.has(id)).toBe(true);
          await sleep(i % 3);
        });
        // The item ends only once its lease is released.
        expect(fake.held.has(id)).toBe(false);
        ended.push(id);
      }),
    );
    expect(ended.sort()).toEqual([...ids].sort());
    expect(fake.groups.flat().sort()).toEqual([...ids].sort()); // each once
    expect(fake.groups.every((g) => g.length >= 1 && g.length <= 8)).toBe(true);
    expect(fake.groups.length).toBeLessThanOrEqual(5); // 20 requests at once: groups of 8, not one acquire each
    // At most 2 groups held at once.
    let holding = 0;
    for (const l of fake.log) {
      holding += l.startsWith('+') ? 1 : -1;
      expect(holding).toBeLessThanOrEqual(2);
    }
  });

  it('while a group is out, requests arriving one by one within a few ms are taken together, not each by itself', async () => {
    // The requests come a turn of the event loop apart, well within the 3 ms fill window, but a busy
    // machine can stall longer than that between two turns: the window runs on fake timers, the
    // turns are real (setImmediate), so "within the window" does not depend on the machine's load.
    jest.useFakeTimers({ doNotFake: ['setImmediate', 'nextTick', 'queueMicrotask'] });
    const turns = async (n: number) => {
      for (let t = 0; t < n; t++) await new Promise((r) => setImmediate(r));
    };
    /** Real turns and fake milliseconds, one of each at a time, until p settles. */
    const settled = async <T>(p: Promise<T>): Promise<T> => {
      let done = false;
      void p.then(
        () => (done = true),
        () => (done = true),
      );
      for (let i = 0; i < 1000 && !done; i++) {
        await turns(1);
        await jest.advanceTimersByTimeAsync(1);
      }
      return p;
    };
    const fake = fakeHold();
    const groups = new VolumeLeaseGroups(fake.hold, 2);
    let letFirstGo!: () => void;
    const firstHeld = new Promise<void>((resolve) => (letFirstGo = resolve));
    const first = groups.withVolumeLease(domain, 'volume-0', 3, 'op', () => firstHeld);
    for (let i = 0; i < 1000 && fake.groups.length === 0; i++) {
      await turns(1);
      await jest.advanceTimersByTimeAsync(1);
    }
    expect(fake.groups).toEqual([['volume-0']]); // the first is held alone (nothing else was waiting)
    const later = [1, 2, 3].map(async (i) => {
      await new Promise((r) => setImmediate(r));
      for (let t = 1; t < i; t++) await new Promise((r) => setImmediate(r));
      return groups.withVolumeLease(domain, `volume-${i}`, 3 + i, 'op', async () => i);
    });
    await turns(5); // all three have asked; no time has passed on the fill window's clock
    expect(await settled(Promise.all(later))).toEqual([1, 2, 3]);
    letFirstGo();
    await settled(first);
    expect(fake.groups).toEqual([['volume-0'], ['volume-1', 'volume-2', 'volume-3']]);
  });

  it('a group refused because one lease is held elsewhere: the others are taken one by one, only the held one is refused', async () => {
    const fake = fakeHold(new Set(['volume-2']));
    const groups = new VolumeLeaseGroups(fake.hold, 1);
    const results = await Promise.allSettled(Array.from({ length: 5 }, (_, i) => groups.withVolumeLease(domain, `volume-${i}`, 3 + i, 'op', async () => i)));
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'rejected', 'fulfilled', 'fulfilled']);
    expect((results[2] as PromiseRejectedResult).reason).toMatchObject({ reason: Reason.LEASE_HELD });
    expect(fake.groups).toEqual([['volume-0'], ['volume-1'], ['volume-3'], ['volume-4']]);
  });

  it("an item's own error is its answer; the group's other items and the release are unaffected", async () => {
    const fake = fakeHold();
    const groups = new VolumeLeaseGroups(fake.hold, 1);
    const results = await Promise.allSettled(
      [0, 1, 2].map((i) =>
        groups.withVolumeLease(domain, `volume-${i}`, 3 + i, 'op', async () => {
          if (i === 1) throw new Error('unlink failed');
          return i;
        }),
      ),
    );
    expect(results.map((r) => (r.status === 'fulfilled' ? r.value : (r.reason as Error).message))).toEqual([0, 'unlink failed', 2]);
    expect(fake.groups).toEqual([['volume-0', 'volume-1', 'volume-2']]);
    expect(fake.held.size).toBe(0);
  });
});
