import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as sanlock from '@sdmesh/sanlock';
import { cancelled, createLogger, GrpcStatus, pb, Reason, SdmeshError, type EventPublisher } from '@sdmesh/common';
import { Registry } from 'prom-client';
import { LeaseManager, type SanlockApi } from '../../services/lease-manager/src/lease-manager';
import { LeaseMetrics } from '../../services/lease-manager/src/metrics';
import { LEASE_AREA_BYTES } from '../../services/lease-manager/src/validation';

/**
 * LeaseManager through its SanlockApi seam: a fake sanlock daemon of one host (host id 1) that
 * keeps lockspaces and resource leases in memory, and can be told another host (id 2) holds a
 * resource. It answers with the error codes the real daemon gives in each case.
 */
class FakeSanlock {
  readonly joined = new Set<string>();
  readonly formatted = new Set<string>();
  /** resource key → holders on this host (pid → shared?) */
  readonly local = new Map<string, Map<number, boolean>>();
  /** resource key → host id of another host holding it, and for how many more acquire attempts */
  readonly remote = new Map<string, { hostId: number; attemptsLeft: number }>();
  readonly hostStates = new Map<number, sanlock.HostState>();
  /** Lockspaces sanlock has failed on this host (renewals not written): acquire answers ENOSPC, as sanlock does. */
  readonly failedLockspaces = new Set<string>();
  lver = 0;
  /** Calls of readResourceOwners (a read of the whole lease area in sanlock). */
  ownerReads = 0;
  /** sanlock_request calls: resource name and force mode. */
  readonly requests: { name: string; force: number; lver?: number }[] = [];

  static key(lockspace: string, r: { name: string; path: string; offset?: number }): string {
    return `${lockspace}\0${r.name}\0${r.path}\0${r.offset ?? 0}`;
  }

  api(): SanlockApi {
    const fail = (op: string, code: number) => new sanlock.SanlockError(op, code);
    const notInFake = (name: string) => () => Promise.reject(new Error(`${name} is not part of this fake`));
    const api = {
      addLockspace: async (opts) => void this.joined.add(opts.name),
      inqLockspace: async (opts) => (this.joined.has(opts.name) ? 'joined' : 'not-joined'),
      remLockspace: async (opts) => void this.joined.delete(opts.name),
      getLockspaces: async () => [],
      getHosts: async () => [...this.hostStates].map(([hostId, state]) => ({ hostId, state, generation: 1, timestamp: 0, ioTimeout: 10, flags: 0 })),
      acquireForPid: async (pid, lockspace, resources, opts) => {
        if (!this.joined.has(lockspace)) throw fail('acquire', sanlock.SanlockCode.SANLK_ACQUIRE_LOCKSPACE);
        if (this.failedLockspaces.has(lockspace)) throw fail('acquire', sanlock.SanlockCode.ENOSPC);
        for (const r of resources) {
          const key = FakeSanlock.key(lockspace, r);
          if (!this.formatted.has(key)) throw fail('acquire', sanlock.SanlockCode.SANLK_LEADER_MAGIC);
          const remote = this.remote.get(key);
          if (remote) {
            if (remote.attemptsLeft-- > 0) throw fail('acquire', sanlock.SanlockCode.SANLK_ACQUIRE_IDLIVE);
            this.remote.delete(key); // that host released it
          }
          const holders = this.local.get(key) ?? new Map<number, boolean>();
          const exclusiveConflict = [...holders].some(([other, shared]) => other !== pid && (!shared || !opts?.shared));
          if (exclusiveConflict) throw fail('acquire', sanlock.SanlockCode.EEXIST);
          holders.set(pid, !!opts?.shared);
          this.local.set(key, holders);
          if (!opts?.shared) this.lver++;
        }
      },
      acquireForPidAndInquire: async (pid, lockspace, resources, opts) => {
        await api.acquireForPid(pid, lockspace, resources, opts);
        return api.inquireForPid(pid);
      },
      acquireManyForPidAndInquire: async (pid, leases, opts) => {
        // All or none, as in sanlock: what the leases before a failing one took is given back.
        const before = [...this.local].map(([key, holders]) => [key, new Map(holders)] as const);
        const lver = this.lver;
        try {
          for (const l of leases) await api.acquireForPid(pid, l.lockspace, [l], { ...opts, shared: l.shared });
        } catch (err) {
          this.local.clear();
          for (const [key, holders] of before) this.local.set(key, holders);
          this.lver = lver;
          throw err;
        }
        return api.inquireForPid(pid);
      },
      releaseForPid: async (pid, lockspace, resources) => {
        for (const r of resources) if (typeof r !== 'string') this.local.get(FakeSanlock.key(lockspace, r))?.delete(pid);
      },
      inquireForPid: async (pid) =>
        [...this.local]
          .filter(([, holders]) => holders.has(pid))
          .map(([key, holders]) => {
            const [lockspace = '', name = '', p = '', offset = '0'] = key.split('\0');
            return { lockspace, name, path: p, offset: Number(offset), lver: holders.get(pid) ? 0 : this.lver, shared: !!holders.get(pid), disks: [] };
          }),
      writeLockspace: async () => undefined,
      readLockspace: notInFake('readLockspace'),
      writeResource: async (r) => {
        this.formatted.add(FakeSanlock.key(r.lockspace, r));
        // As sanlock does: the area's leader record names the lockspace and the resource.
        const fd = fs.openSync(r.path, 'r+');
        fs.writeSync(fd, leaderSector(r.lockspace, r.name), 0, 512, r.offset ?? 0);
        fs.closeSync(fd);
      },
      readResourceOwners: async (lockspace, name, p, offset) => {
        this.ownerReads++;
        const remote = this.remote.get(FakeSanlock.key(lockspace, { name, path: p, offset }));
        return { lver: this.lver, shared: false, owners: remote ? [{ hostId: remote.hostId, generation: 1, timestamp: 1 }] : [] };
      },
      registerProcess: () => {
        throw new Error('registerProcess is not part of this fake (start() is not called)');
      },
      request: async (_lockspace, r, opts) => void this.requests.push({ name: r.name, force: opts.force, lver: opts.lver }),
    } as SanlockApi;
    return api;
  }
}

/** A leader record sector as sanlock writes it (the fields the lease-manager reads: magic, lockspace, resource). */
function leaderSector(lockspace: string, resource: string): Buffer {
  const sector = Buffer.alloc(512);
  sector.writeUInt32LE(0x06152010, 0);
  sector.write(lockspace, 56, 48, 'latin1');
  sector.write(resource, 104, 48, 'latin1');
  return sector;
}

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

const OWN_PID = 4001;
const OTHER_PID = 4002;
const LOCKSPACE = 'ls-1';

interface Fixture {
  manager: LeaseManager;
  fake: FakeSanlock;
  alive: Set<number>;
  /** Payloads of the events the manager published. */
  events: Parameters<EventPublisher['publish']>[0][];
  /** The time each of them says it happened. */
  eventTimes: Date[];
  location: { lockspace: string; resource: string; path: string; offset: number };
  dir: string;
}

async function fixture(opts: { join?: boolean; format?: boolean; dir?: string; stateDir?: string; eventsAfterReply?: boolean } = {}): Promise<Fixture> {
  const dir = opts.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'lease-manager-unit-'));
  const fake = new FakeSanlock();
  const alive = new Set([OWN_PID, OTHER_PID]);
  const events: Fixture['events'] = [];
  const eventTimes: Date[] = [];
  dirs.push(dir);
  const manager = new LeaseManager({
    hostId: 1,
    defaultIoTimeout: 10,
    log: createLogger('lease-manager-test', 'silent'),
    // Only publish is used; the rest of EventPublisher talks to NATS.
    events: {
      publish: (payload: Fixture['events'][number], time = new Date()) => {
        events.push(payload);
        eventTimes.push(time);
        return pb.Event.fromPartial({ payload, time });
      },
    } as Pick<EventPublisher, 'publish'> as unknown as EventPublisher,
    metrics: new LeaseMetrics(new Registry()),
    sanlock: fake.api(),
    holderGraceMs: 0,
    pidAlive: (pid) => alive.has(pid),
    stateDir: opts.stateDir,
    eventsAfterReply: opts.eventsAfterReply,
  });
  const idsPath = path.join(dir, 'ids');
  fs.writeFileSync(idsPath, Buffer.alloc(LEASE_AREA_BYTES));
  const location = { lockspace: LOCKSPACE, resource: 'vol-a', path: path.join(dir, 'leases'), offset: LEASE_AREA_BYTES };
  if (opts.join ?? true) await manager.joinLockspace({ name: LOCKSPACE, path: idsPath, hostId: 1, ioTimeout: 10, wait: true });
  if (opts.format ?? true) await manager.formatLeases([location]);
  return { manager, fake, alive, events, eventTimes, location, dir };
}

const acquire = (f: Fixture, pid: number, mode: 'exclusive' | 'shared' = 'exclusive', wait = false) =>
  f.manager.acquire({ location: f.location, mode, pid, operationId: `op-${pid}`, wait });

async function errorOf(p: Promise<unknown>): Promise<SdmeshError> {
  const outcome = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  if (!(outcome instanceof SdmeshError)) throw new Error(`expected an SdmeshError, got ${String(outcome)}`);
  return outcome;
}

const leaseEventKinds = (f: Fixture) => f.events.flatMap((e) => (e.$case === 'lease' ? [pb.LeaseEvent_Kind[e.lease.kind]] : []));

describe('LeaseManager with a fake sanlock', () => {
  it('acquires a free lease exclusively (the lver is the fencing token) and releases it', async () => {
    const f = await fixture();
    const lease = await acquire(f, OWN_PID);
    expect(lease.lver).toBe(1);
    expect(f.manager.heldLeases().map((h) => [h.pid, h.location.resource, h.mode])).toEqual([[OWN_PID, 'vol-a', 'exclusive']]);
    await f.manager.release(f.location, OWN_PID);
    expect(f.manager.heldLeases()).toEqual([]);
    expect(f.fake.local.get(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }))?.size).toBe(0);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED']);
  });

  it('request_if_held: a try refused because another host holds the lease records a request for it (no force) before answering; other refusals and plain tries do not', async () => {
    const f = await fixture();
    const key = FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset });
    f.fake.remote.set(key, { hostId: 2, attemptsLeft: 99 });
    // As sanlock shows host 2's hold on storage: the leader held (timestamp set) at version 41.
    const held = leaderSector(LOCKSPACE, 'vol-a');
    held.writeBigUInt64LE(41n, 48);
    held.writeBigUInt64LE(1000n, 152);
    const fd = fs.openSync(f.location.path, 'r+');
    fs.writeSync(fd, held, 0, 512, f.location.offset);
    fs.closeSync(fd);
    const tryIt = (requestIfHeld: boolean, pid = OWN_PID) =>
      errorOf(f.manager.acquire({ location: f.location, mode: 'exclusive', pid, operationId: 'op', wait: false, requestIfHeld }));
    expect((await tryIt(false)).reason).toBe(Reason.LEASE_HELD);
    expect(f.fake.requests).toEqual([]);
    expect((await tryIt(true)).reason).toBe(Reason.LEASE_HELD);
    // The version after the one held: sanlock clears the record when given none without a force mode.
    expect(f.fake.requests).toEqual([{ name: 'vol-a', force: 0, lver: 42 }]);
    // Held by another process of this host: nobody to ask on storage.
    f.fake.remote.delete(key);
    await acquire(f, OTHER_PID);
    expect((await tryIt(true)).reason).toBe(Reason.LEASE_HELD_ON_THIS_HOST);
    expect(f.fake.requests).toHaveLength(1);
  });

  it('a waiting acquire of a lease another host keeps answers its deadline or cancel, not the last refusal (one lease and several)', async () => {
    const f = await fixture();
    f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), { hostId: 2, attemptsLeft: 1e6 });
    const waitFor = (end: SdmeshError, start: (signal: AbortSignal) => Promise<unknown>) => {
      const controller = new AbortController();
      setTimeout(() => controller.abort(end), 120);
      return errorOf(start(controller.signal));
    };
    const deadline = new SdmeshError(GrpcStatus.DEADLINE_EXCEEDED, 'deadline passed');
    const gaveUp = cancelled('the caller gave up');
    const one = (signal: AbortSignal) => f.manager.acquire({ location: f.location, mode: 'exclusive', pid: OWN_PID, operationId: 'op-w', wait: true, signal });
    const many = (signal: AbortSignal) =>
      f.manager.acquireMany({ leases: [{ location: f.location, mode: 'exclusive' }], pid: OWN_PID, operationId: 'op-w', wait: true, signal });
    expect((await waitFor(deadline, one)).code).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    expect((await waitFor(gaveUp, one)).code).toBe(GrpcStatus.CANCELLED);
    expect((await waitFor(deadline, many)).code).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    expect(f.manager.heldLeases()).toEqual([]);
  });

  it('lets two processes of this host share a lease', async () => {
    const f = await fixture();
    await acquire(f, OWN_PID, 'shared');
    await acquire(f, OTHER_PID, 'shared');
    expect(
      f.manager
        .heldLeases()
        .map((h) => h.pid)
        .sort(),
    ).toEqual([OWN_PID, OTHER_PID]);
  });

  it.each<{ name: string; setup: (f: Fixture) => Promise<void> | void; reason: string; message: RegExp }>([
    {
      name: 'another host holds it',
      setup: (f) =>
        void f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), {
          hostId: 2,
          attemptsLeft: 99,
        }),
      reason: Reason.LEASE_HELD,
      message: /held \(exclusive\) by host id 2/,
    },
    {
      name: 'another process of this host holds it',
      setup: async (f) => void (await acquire(f, OTHER_PID)),
      reason: Reason.LEASE_HELD_ON_THIS_HOST,
      message: /pid 4002 for operation "op-4002"/,
    },
    {
      name: 'the caller already holds it',
      setup: async (f) => void (await acquire(f, OWN_PID)),
      reason: Reason.LEASE_ALREADY_HELD,
      message: /already held by pid 4001/,
    },
    { name: 'the holder is not running', setup: (f) => void f.alive.delete(OWN_PID), reason: Reason.HOLDER_NOT_RUNNING, message: /not a running process/ },
    {
      name: 'the lease area was never formatted',
      setup: (f) => void f.fake.formatted.clear(),
      reason: Reason.LEASE_AREA_INVALID,
      message: /format it first/,
    },
  ])('refuses without waiting when $name', async ({ setup, reason, message }) => {
    const f = await fixture();
    await setup(f);
    const err = await errorOf(acquire(f, OWN_PID));
    expect([err.reason, err.message]).toEqual([reason, expect.stringMatching(message)]);
    // Nothing new is held: only what the setup took.
    const expectedHeld = reason === Reason.LEASE_ALREADY_HELD ? [OWN_PID] : reason === Reason.LEASE_HELD_ON_THIS_HOST ? [OTHER_PID] : [];
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual(expectedHeld);
  });

  it('a grant whose call was cancelled meanwhile is released at once (its answer would be lost), for one lease and for several', async () => {
    const f = await fixture();
    const key = FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset });
    const gone = new AbortController();
    gone.abort(new SdmeshError(GrpcStatus.CANCELLED, 'call cancelled by the client'));
    const one = await errorOf(
      f.manager.acquire({ location: f.location, mode: 'exclusive', pid: OWN_PID, operationId: 'op-gone', wait: false, signal: gone.signal }),
    );
    expect(one.code).toBe(GrpcStatus.CANCELLED);
    const many = await errorOf(
      f.manager.acquireMany({ leases: [{ location: f.location, mode: 'exclusive' }], pid: OWN_PID, operationId: 'op-gone', wait: false, signal: gone.signal }),
    );
    expect(many.code).toBe(GrpcStatus.CANCELLED);
    expect(f.manager.heldLeases()).toEqual([]);
    expect(f.fake.local.get(key)?.has(OWN_PID) ?? false).toBe(false);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED', 'KIND_RELEASED']);
  });

  it('records a release its holder made itself in sanlock without a sanlock call; a notice of an older grant forgets nothing', async () => {
    const f = await fixture();
    const key = FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset });
    const first = await acquire(f, OWN_PID);
    // The holder releases on its own registered connection (LeaseHolder.withLease), then tells the lease-manager.
    f.fake.local.get(key)!.delete(OWN_PID);
    f.manager.releasedByHolder(f.location, OWN_PID, first.acquireTime);
    expect(f.manager.heldLeases()).toEqual([]);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED']);
    // A notice naming an earlier grant than the table's (it was overtaken by a new acquire) changes nothing.
    await acquire(f, OWN_PID);
    f.manager.releasedByHolder(f.location, OWN_PID, new Date(first.acquireTime.getTime() - 1000));
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual([OWN_PID]);
    expect(f.fake.local.get(key)?.has(OWN_PID)).toBe(true);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED']);
    // A notice of another process's lease, or of a lease not held, is a no-op too.
    f.manager.releasedByHolder(f.location, OTHER_PID, first.acquireTime);
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual([OWN_PID]);
  });

  it('acquires again for a holder whose earlier grant sanlock no longer has (its release notice not here yet), and refuses one it still holds', async () => {
    const f = await fixture();
    const key = FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset });
    await acquire(f, OWN_PID);
    expect((await errorOf(acquire(f, OWN_PID))).reason).toBe(Reason.LEASE_ALREADY_HELD);
    f.fake.local.get(key)!.delete(OWN_PID); // released by the holder itself
    const again = await acquire(f, OWN_PID);
    expect(again.lver).toBe(2);
    expect(f.manager.heldLeases().map((h) => [h.pid, h.lver])).toEqual([[OWN_PID, 2]]);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED']);
  });

  it('with eventsAfterReply publishes the events after the call has returned, in order', async () => {
    const f = await fixture({ eventsAfterReply: true });
    await acquire(f, OWN_PID);
    await f.manager.release(f.location, OWN_PID);
    expect(leaseEventKinds(f)).toEqual([]);
    // Right after this turn of the event loop, or once the batch window of the join's event ends.
    for (let i = 0; i < 100 && leaseEventKinds(f).length < 2; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED']);
  });

  it('with eventsAfterReply publishes the events of calls back to back together, at most every 20 ms, each with the time it happened', async () => {
    // Only timers and the clock are faked: promises and setImmediate run as usual.
    jest.useFakeTimers({ doNotFake: ['setImmediate', 'nextTick', 'queueMicrotask'] });
    try {
      const f = await fixture({ eventsAfterReply: true });
      await new Promise((resolve) => setImmediate(resolve));
      expect(f.events.map((e) => e.$case)).toEqual(['lockspace']); // the join's event: flushed at once
      const acquiredAt = Date.now();
      await acquire(f, OWN_PID);
      jest.advanceTimersByTime(5);
      const releasedAt = Date.now();
      await f.manager.release(f.location, OWN_PID);
      await new Promise((resolve) => setImmediate(resolve));
      expect(leaseEventKinds(f)).toEqual([]); // within 20 ms of the last flush: held back
      jest.advanceTimersByTime(15);
      expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED']);
      expect(f.eventTimes.slice(1).map((t) => t.getTime())).toEqual([acquiredAt, releasedAt]);
      // Long after the last flush an event goes out right after the call again.
      jest.advanceTimersByTime(100);
      await acquire(f, OWN_PID);
      await new Promise((resolve) => setImmediate(resolve));
      expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED']);
    } finally {
      jest.useRealTimers();
    }
  });

  it('refuses a lease of a lockspace this host has not joined', async () => {
    const f = await fixture({ join: false });
    const err = await errorOf(acquire(f, OWN_PID));
    expect(err.reason).toBe(Reason.LOCKSPACE_NOT_JOINED);
  });

  it('a lockspace sanlock has failed on this host (acquire answers ENOSPC) is LOCKSPACE_NOT_JOINED, not a full disk (chaos seed 21)', async () => {
    const f = await fixture();
    f.fake.failedLockspaces.add(LOCKSPACE);
    const err = await errorOf(acquire(f, OWN_PID));
    expect(err.reason).toBe(Reason.LOCKSPACE_NOT_JOINED);
    expect(err.message).toMatch(/lost or failed/);
  });

  it('announces contention, and with wait takes the lease once the other host lets go', async () => {
    const f = await fixture();
    f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), { hostId: 2, attemptsLeft: 2 });
    const lease = await acquire(f, OWN_PID, 'exclusive', true);
    expect(lease.pid).toBe(OWN_PID);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED']);
    f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), { hostId: 2, attemptsLeft: 99 });
    await errorOf(acquire(f, OTHER_PID));
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_CONTENDED']);
  });

  it('refuses to release a lease the caller does not hold', async () => {
    const f = await fixture();
    await acquire(f, OTHER_PID);
    const err = await errorOf(f.manager.release(f.location, OWN_PID));
    expect(err.reason).toBe(Reason.LEASE_NOT_HELD);
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual([OTHER_PID]);
  });

  it("reports a dead holder's lease released (after the grace period) and frees it for others", async () => {
    const f = await fixture();
    await acquire(f, OTHER_PID);
    f.alive.delete(OTHER_PID);
    // sanlock frees a dead process's leases itself; the manager only forgets its record.
    f.fake.local.clear();
    expect(f.manager.heldLeases()).toEqual([]);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED']);
    await acquire(f, OWN_PID);
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual([OWN_PID]);
  });

  it.each<{ name: string; run: (f: Fixture) => Promise<unknown>; reason: string }>([
    {
      name: 'a lease area held on this host',
      run: async (f) => {
        await acquire(f, OTHER_PID);
        return f.manager.formatLeases([f.location]);
      },
      reason: Reason.LEASE_AREA_IN_USE,
    },
    {
      name: 'a lease area a live host owns according to sanlock',
      run: (f) => {
        f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), { hostId: 2, attemptsLeft: 99 });
        f.fake.hostStates.set(2, 'live');
        return f.manager.formatLeases([f.location]);
      },
      reason: Reason.LEASE_AREA_IN_USE,
    },
    { name: 'a joined lockspace', run: (f) => f.manager.formatLockspace(LOCKSPACE, path.join(f.dir, 'ids'), 2000, 10), reason: Reason.LOCKSPACE_IN_USE },
    {
      name: 'the lockspace of a committed domain',
      run: (f) => {
        fs.writeFileSync(path.join(f.dir, 'metadata'), 'committed');
        return f.manager.formatLockspace('ls-2', path.join(f.dir, 'ids'), 2000, 10);
      },
      reason: Reason.LOCKSPACE_IN_USE,
    },
  ])('refuses to format $name', async ({ run, reason }) => {
    const f = await fixture();
    const err = await errorOf(run(f));
    expect(err.reason).toBe(reason);
  });

  it('formats a lease area a dead host still names as owner', async () => {
    const f = await fixture();
    f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }), { hostId: 2, attemptsLeft: 99 });
    f.fake.hostStates.set(2, 'dead');
    await expect(f.manager.formatLeases([f.location])).resolves.toBe(1);
  });

  it('asks sanlock for owners only of an area whose leader record names the resource being formatted', async () => {
    const f = await fixture();
    const reads = f.fake.ownerReads;
    const live = (resource: string, offset: number) => {
      f.fake.remote.set(FakeSanlock.key(LOCKSPACE, { name: resource, path: f.location.path, offset }), { hostId: 2, attemptsLeft: 99 });
      f.fake.hostStates.set(2, 'live');
    };
    // An area never formatted, and one formatted for another resource (a deleted volume's slot):
    // sanlock's own owner read fails on them (its leader check), so it is not asked.
    const fresh = { ...f.location, resource: 'vol-b', offset: 4 * LEASE_AREA_BYTES };
    live('vol-b', fresh.offset);
    await expect(f.manager.formatLeases([fresh])).resolves.toBe(1);
    const reused = { ...f.location, resource: 'vol-c' };
    live('vol-c', reused.offset);
    await expect(f.manager.formatLeases([reused])).resolves.toBe(1);
    expect(f.fake.ownerReads).toBe(reads);
    // The area now names vol-c: formatting it again asks sanlock, which names a live owner.
    expect((await errorOf(f.manager.formatLeases([reused]))).reason).toBe(Reason.LEASE_AREA_IN_USE);
    expect(f.fake.ownerReads).toBe(reads + 1);
  });

  it("obeys the scheduler's newest lockspace order: after a leave order only a newer join order joins again", async () => {
    const f = await fixture();
    const idsPath = path.join(f.dir, 'ids');
    const join = (epoch?: number) => f.manager.joinLockspace({ name: LOCKSPACE, path: idsPath, hostId: 1, ioTimeout: 10, wait: true, epoch });
    await f.manager.leaveLockspace(LOCKSPACE, true, 2000);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(false);
    // A join on first use (a GC pass, a stray step) and a join of an older order (a stale heartbeat answer) are refused.
    for (const epoch of [undefined, 1000, 2000]) expect((await errorOf(join(epoch))).reason).toBe(Reason.LOCKSPACE_LEFT);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(false);
    await join(3000);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(true);
    // A leave order older than that join is stale and ignored; joins on first use work again.
    await f.manager.leaveLockspace(LOCKSPACE, true, 2500);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(true);
    await join();
    // Once a new leave order arrives, no new lease is given in the lockspace, even before it is left.
    await acquire(f, OWN_PID);
    const busy = await errorOf(f.manager.leaveLockspace(LOCKSPACE, true, 4000));
    expect(busy.reason).toBe(Reason.LOCKSPACE_IN_USE);
    expect((await errorOf(acquire(f, OTHER_PID))).reason).toBe(Reason.LOCKSPACE_LEFT);
    await f.manager.release(f.location, OWN_PID);
    await f.manager.leaveLockspace(LOCKSPACE, true, 4000);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(false);
  });

  it('joins from a heartbeat answer: a lockspace left on an order only for a newer answer, one left by hand never', async () => {
    const f = await fixture();
    const idsPath = path.join(f.dir, 'ids');
    const announced = (epoch: number) => f.manager.joinAnnounced({ name: LOCKSPACE, path: idsPath, hostId: 1, ioTimeout: 10, epoch });
    await f.manager.leaveLockspace(LOCKSPACE, true);
    expect((await announced(5000)).state).toBe(pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED);
    expect(f.fake.joined.has(LOCKSPACE)).toBe(false);
    await f.manager.joinLockspace({ name: LOCKSPACE, path: idsPath, hostId: 1, ioTimeout: 10, wait: true, epoch: 6000 });
    await f.manager.leaveLockspace(LOCKSPACE, true, 7000);
    expect((await errorOf(announced(6000))).reason).toBe(Reason.LOCKSPACE_LEFT);
    expect((await announced(8000)).state).toBe(pb.LockspaceState.LOCKSPACE_STATE_JOINING);
  });

  it('keeps the orders across a restart with a state directory', async () => {
    const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lease-manager-state-'));
    dirs.push(stateDir);
    const f = await fixture({ stateDir });
    await f.manager.leaveLockspace(LOCKSPACE, true, 2000);
    const again = await fixture({ join: false, format: false, dir: f.dir, stateDir });
    const err = await errorOf(again.manager.joinLockspace({ name: LOCKSPACE, path: path.join(f.dir, 'ids'), hostId: 1, ioTimeout: 10, wait: true }));
    expect(err.reason).toBe(Reason.LOCKSPACE_LEFT);
  });

  // issue 17: the held-lease table is written after the call's reply (at most every 20 ms while calls come back to back).
  it('writes its held-lease table after each grant and release, and a lease its table misses is still released', async () => {
    const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'lease-manager-state-'));
    dirs.push(stateDir);
    const tableFile = path.join(stateDir, 'held-leases.json');
    const savedTable = () =>
      (JSON.parse(fs.readFileSync(tableFile, 'utf8')) as { pid: number; location: { resource: string } }[]).map((h) => [h.pid, h.location.resource]);
    const tableSays = async (expected: unknown[]) => {
      for (let i = 0; i < 200 && JSON.stringify(fs.existsSync(tableFile) ? savedTable() : undefined) !== JSON.stringify(expected); i++) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      expect(savedTable()).toEqual(expected);
    };
    const f = await fixture({ stateDir });
    await acquire(f, OWN_PID);
    await tableSays([[OWN_PID, 'vol-a']]);
    await f.manager.release(f.location, OWN_PID);
    await tableSays([]);
    // A restart that lost the table (the grant came after its last write): sanlock still gives the lease to its holder, and its release goes through.
    await acquire(f, OWN_PID);
    const restarted = new LeaseManager({
      hostId: 1,
      defaultIoTimeout: 10,
      log: createLogger('lease-manager-test', 'silent'),
      events: { publish: () => pb.Event.fromPartial({}) } as Pick<EventPublisher, 'publish'> as unknown as EventPublisher,
      metrics: new LeaseMetrics(new Registry()),
      sanlock: f.fake.api(),
      pidAlive: (pid) => f.alive.has(pid),
    });
    await restarted.joinLockspace({ name: LOCKSPACE, path: path.join(f.dir, 'ids'), hostId: 1, ioTimeout: 10, wait: true });
    expect(restarted.heldLeases()).toEqual([]);
    await restarted.release(f.location, OWN_PID);
    expect(f.fake.local.get(FakeSanlock.key(LOCKSPACE, { name: 'vol-a', path: f.location.path, offset: f.location.offset }))?.size).toBe(0);
  });
});

// issue 17 (copy fixed cost): AcquireLeases, several leases in one sanlock acquire.
describe('LeaseManager.acquireMany with a fake sanlock', () => {
  /** A second lease area in the fixture's lockspace, formatted. */
  async function secondLease(f: Fixture, resource = 'vol-b') {
    const location = { ...f.location, resource, offset: 2 * LEASE_AREA_BYTES };
    await f.manager.formatLeases([location]);
    return location;
  }
  /** A copy's leases: the fixture's lease shared (the source), `other` exclusive (the destination). */
  const copyLeases = (f: Fixture, other: Fixture['location'], wait = false) =>
    f.manager.acquireMany({
      leases: [
        { location: f.location, mode: 'shared' },
        { location: other, mode: 'exclusive' },
      ],
      pid: OWN_PID,
      operationId: 'copy-1',
      wait,
    });
  const keyOf = (l: Fixture['location']) => FakeSanlock.key(l.lockspace, { name: l.resource, path: l.path, offset: l.offset });

  it('takes a shared and an exclusive lease in one call: table, lver of the exclusive one, one ACQUIRED event each', async () => {
    const f = await fixture();
    const other = await secondLease(f);
    const granted = await copyLeases(f, other);
    expect(granted.map((g) => [g.location.resource, g.mode, g.lver, g.operationId])).toEqual([
      ['vol-a', 'shared', 0, 'copy-1'],
      ['vol-b', 'exclusive', 1, 'copy-1'],
    ]);
    expect(f.manager.heldLeases(OWN_PID).map((h) => [h.location.resource, h.mode])).toEqual([
      ['vol-a', 'shared'],
      ['vol-b', 'exclusive'],
    ]);
    // In sanlock: the source shared (another reader of this host may share it), the destination exclusive.
    expect(f.fake.local.get(keyOf(f.location))?.get(OWN_PID)).toBe(true);
    expect(f.fake.local.get(keyOf(other))?.get(OWN_PID)).toBe(false);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_ACQUIRED']);
    await acquire(f, OTHER_PID, 'shared');
    expect((await errorOf(f.manager.acquire({ location: other, mode: 'shared', pid: OTHER_PID, operationId: 'x', wait: false }))).reason).toBe(
      Reason.LEASE_HELD_ON_THIS_HOST,
    );
  });

  it('all or none: a lease held by another host fails the call naming that lease, and the other one is not kept', async () => {
    const f = await fixture();
    const other = await secondLease(f);
    f.fake.remote.set(keyOf(other), { hostId: 2, attemptsLeft: 99 });
    const leases = [
      { location: f.location, mode: 'exclusive' as const },
      { location: other, mode: 'exclusive' as const },
    ];
    const err = await errorOf(f.manager.acquireMany({ leases, pid: OWN_PID, operationId: 'copy-1', wait: false }));
    expect([err.reason, err.message]).toEqual([Reason.LEASE_HELD, expect.stringMatching(/lease "vol-b" .* held \(exclusive\) by host id 2/)]);
    expect(f.manager.heldLeases()).toEqual([]);
    expect(f.fake.local.get(keyOf(f.location))?.has(OWN_PID) ?? false).toBe(false);
    const contended = f.events.flatMap((e) => (e.$case === 'lease' ? [[pb.LeaseEvent_Kind[e.lease.kind], e.lease.lease?.resource]] : []));
    expect(contended).toEqual([['KIND_CONTENDED', 'vol-b']]);
    // The first lease is free for another process.
    expect((await acquire(f, OTHER_PID)).pid).toBe(OTHER_PID);
  });

  it('names the lease another process of this host holds', async () => {
    const f = await fixture();
    const other = await secondLease(f);
    await f.manager.acquire({ location: other, mode: 'exclusive', pid: OTHER_PID, operationId: 'op-4002', wait: false });
    const err = await errorOf(copyLeases(f, other));
    expect([err.reason, err.message]).toEqual([Reason.LEASE_HELD_ON_THIS_HOST, expect.stringMatching(/"vol-b".*pid 4002 for operation "op-4002"/)]);
    expect(f.manager.heldLeases().map((h) => h.pid)).toEqual([OTHER_PID]);
  });

  it('with wait takes both once the other host lets go', async () => {
    const f = await fixture();
    const other = await secondLease(f);
    f.fake.remote.set(keyOf(f.location), { hostId: 2, attemptsLeft: 2 });
    const granted = await copyLeases(f, other, true);
    expect(granted.map((g) => g.location.resource)).toEqual(['vol-a', 'vol-b']);
    expect(leaseEventKinds(f)).toEqual(['KIND_ACQUIRED', 'KIND_ACQUIRED']);
  });

  it.each<{
    name: string;
    leases: (f: Fixture, other: Fixture['location']) => { location: Fixture['location']; mode: 'exclusive' | 'shared' }[];
    reason: string;
    message: RegExp;
  }>([
    { name: 'no lease', leases: () => [], reason: Reason.INVALID_ARGUMENT, message: /at least one lease/ },
    {
      name: 'more than 8',
      leases: (f) =>
        Array.from({ length: 9 }, (_, i) => ({
          location: { ...f.location, resource: `vol-${i}`, offset: (i + 1) * LEASE_AREA_BYTES },
          mode: 'shared' as const,
        })),
      reason: Reason.INVALID_ARGUMENT,
      message: /at most 8 per call/,
    },
    {
      name: 'one lease twice (even in two modes)',
      leases: (f) => [
        { location: f.location, mode: 'shared' },
        { location: f.location, mode: 'exclusive' },
      ],
      reason: Reason.INVALID_ARGUMENT,
      message: /asked for twice/,
    },
    {
      name: 'two names for one lease area',
      leases: (f) => [
        { location: f.location, mode: 'shared' },
        { location: { ...f.location, resource: 'vol-z' }, mode: 'exclusive' },
      ],
      reason: Reason.INVALID_ARGUMENT,
      message: /asked for twice/,
    },
    {
      name: 'one lease in a lockspace not joined',
      leases: (f, other) => [
        { location: f.location, mode: 'shared' },
        { location: { ...other, lockspace: 'ls-2' }, mode: 'exclusive' },
      ],
      reason: Reason.LOCKSPACE_NOT_JOINED,
      message: /"ls-2"/,
    },
    {
      name: 'one lease area never formatted',
      leases: (f) => [
        { location: f.location, mode: 'shared' },
        { location: { ...f.location, resource: 'vol-c', offset: 3 * LEASE_AREA_BYTES }, mode: 'exclusive' },
      ],
      reason: Reason.LEASE_AREA_INVALID,
      message: /./,
    },
  ])('refuses $name, taking nothing', async ({ leases, reason, message }) => {
    const f = await fixture();
    const other = await secondLease(f);
    const err = await errorOf(f.manager.acquireMany({ leases: leases(f, other), pid: OWN_PID, operationId: 'copy-1', wait: false }));
    expect([err.reason, err.message]).toEqual([reason, expect.stringMatching(message)]);
    expect(f.manager.heldLeases()).toEqual([]);
    expect([...f.fake.local.values()].every((holders) => !holders.has(OWN_PID))).toBe(true);
  });
});

describe('LeaseManager started while sanlock is still adding a lockspace', () => {
  it('follows the join the previous process started: JoinLockspace(wait) answers JOINED once sanlock has added it', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lease-manager-unit-'));
    dirs.push(dir);
    const idsPath = path.join(dir, 'ids');
    fs.writeFileSync(idsPath, Buffer.alloc(LEASE_AREA_BYTES));
    const fake = new FakeSanlock();
    const api = fake.api();
    let added = false;
    // The previous lease-manager died after asking sanlock to add the lockspace; the daemon is still adding it.
    api.getLockspaces = async () => [{ name: LOCKSPACE, hostId: 1, path: idsPath, offset: 0, flags: 0, adding: !added, removing: false }];
    api.inqLockspace = async () => (added ? 'joined' : 'joining');
    api.addLockspace = async () => {
      throw new sanlock.SanlockError('add_lockspace', sanlock.SanlockCode.EEXIST);
    };
    // start() watches the daemon through a registered connection: nothing to watch here.
    api.registerProcess = () =>
      ({ inquire: async () => [], on: () => undefined, close: async () => undefined }) as unknown as ReturnType<SanlockApi['registerProcess']>;
    const manager = new LeaseManager({
      hostId: 1,
      defaultIoTimeout: 10,
      log: createLogger('lease-manager-test', 'silent'),
      events: { publish: () => pb.Event.fromPartial({}) } as unknown as EventPublisher,
      metrics: new LeaseMetrics(new Registry()),
      sanlock: api,
      holderGraceMs: 0,
      pidAlive: () => true,
    });
    await manager.start(60_000);
    try {
      const addedLater = setTimeout(() => (added = true), 300);
      const view = await manager.joinLockspace({ name: LOCKSPACE, path: idsPath, hostId: 1, ioTimeout: 10, wait: true });
      clearTimeout(addedLater);
      expect(added).toBe(true);
      expect(view.state).toBe(pb.LockspaceState.LOCKSPACE_STATE_JOINED);
    } finally {
      await manager.stop();
    }
  });
});
