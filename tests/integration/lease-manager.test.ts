import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { GrpcStatus, MAX_HOST_ID, pb, SdmeshError } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { LeaseCluster } from '../harness/lease-cluster';
import { TestLeaseHolder } from '../harness/lease-holder';

/**
 * The lease-manager against real sanlock: 3 simulated hosts share one lockspace file
 * (io_timeout 1 s), holders are separate processes registered with their host's daemon.
 */
describe('lease-manager with 3 sanlock hosts', () => {
  const cluster = new LeaseCluster();
  const holders: TestLeaseHolder[] = [];
  let domain: Awaited<ReturnType<LeaseCluster['formatDomain']>>;
  const LS = 'ls-main';

  const holder = async (hostId: number) => {
    const h = cluster.host(hostId);
    const t = await TestLeaseHolder.start(h.sanlock.env, h.leaseSocket);
    holders.push(t);
    return t;
  };

  beforeAll(async () => {
    await cluster.start(3);
    domain = await cluster.formatDomain(LS, ['R-exclusive', 'R-shared', 'R-death', 'R-bad', 'R-hostdeath', 'R-own']);
    const joined = await Promise.all(cluster.hosts.map((h) => h.client.joinLockspace({ lockspace: LS, path: domain.ids, wait: true }, { timeoutMs: 60000 })));
    for (const [i, ls] of joined.entries()) {
      expect(ls.state).toBe(pb.LockspaceState.LOCKSPACE_STATE_JOINED);
      expect(ls.hostId).toBe(i + 1);
    }
  });
  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill()));
    await cluster.stop();
  });

  it('reports every host live in the lockspace', async () => {
    // A host is "live" once this host has seen it renew, a few seconds after joining.
    const live = await waitFor(
      'hosts 1-3 live',
      async () => {
        const { hosts } = await cluster.host(1).client.listLockspaceHosts({ lockspace: LS });
        const ids = hosts
          .filter((h) => h.liveness === pb.HostLiveness.HOST_LIVENESS_LIVE)
          .map((h) => h.hostId)
          .sort();
        return ids.length === 3 ? ids : undefined;
      },
      20000,
      250,
    );
    expect(live).toEqual([1, 2, 3]);
    const joined = cluster.eventsOf('lockspace').filter((e) => e.lockspace.kind === pb.LockspaceEvent_Kind.KIND_JOINED && e.lockspace.lockspace === LS);
    expect(joined.map((e) => e.lockspace.hostId).sort()).toEqual([1, 2, 3]);
  });

  it('formats lease areas for host ids 1..250 (sanlock num_hosts), and a host id above that is refused at join', async () => {
    const l = domain.location('R-own');
    const leader = execFileSync('sanlock', ['direct', 'read_leader', '-r', `${LS}:${l.resource}:${l.path}:${l.offset}`], { encoding: 'utf8' });
    expect(leader).toMatch(/^num_hosts 250$/m);
    expect(leader).toMatch(/^resource_name R-own$/m);
    const err = await cluster
      .host(1)
      .client.joinLockspace({ lockspace: 'ls-high', path: domain.ids, hostId: MAX_HOST_ID + 1 })
      .catch((e: unknown) => SdmeshError.from(e));
    expect(err).toBeInstanceOf(SdmeshError);
    expect([(err as SdmeshError).code, (err as SdmeshError).message]).toEqual([GrpcStatus.INVALID_ARGUMENT, `host id must be 1..250, got ${MAX_HOST_ID + 1}`]);
  });

  it('exclusive: host 1 holds it, hosts 2 and 3 are refused with the holder named, then host 2 gets it', async () => {
    const [h1, h2, h3] = await Promise.all([holder(1), holder(2), holder(3)]);
    const loc = domain.location('R-exclusive');
    const got = await h1.acquire(loc, 'exclusive', { operationId: 'op-1' });
    expect(got.ok).toBe(true);
    if (got.ok) expect(got.result.lver).toBeGreaterThan(0);
    for (const other of [h2, h3]) {
      const refused = await other.acquire(loc, 'exclusive');
      expect(refused.ok).toBe(false);
      if (!refused.ok) {
        expect(refused.error.code).toBe(GrpcStatus.ABORTED);
        expect(refused.error.reason).toBe('LEASE_HELD');
        expect(refused.error.message).toMatch(/held \(exclusive\) by host id 1\b/);
      }
    }
    const owner = await cluster.host(3).client.getLeaseOwner({ lease: loc });
    expect(owner.ownerHostIds).toEqual([1]);
    const held = await cluster.host(1).client.listHeldLeases({});
    expect(held.leases.map((l) => [l.location?.resource, l.holderPid, l.operationId])).toEqual([['R-exclusive', h1.pid, 'op-1']]);
    // The scheduler's view over mTLS: the same lease, without the holder's pid.
    const remote = await cluster.host(1).remote.listHeldLeases({});
    expect(remote.leases.map((l) => [l.location?.resource, l.holderPid, l.operationId])).toEqual([['R-exclusive', 0, 'op-1']]);

    expect((await h1.release(loc)).ok).toBe(true);
    const second = await h2.acquire(loc, 'exclusive');
    expect(second.ok).toBe(true);
    expect((await h2.release(loc)).ok).toBe(true);
    const kinds = cluster
      .eventsOf('lease')
      .filter((e) => e.lease.lease?.resource === 'R-exclusive')
      .map((e) => e.lease.kind);
    expect(kinds).toEqual(expect.arrayContaining([pb.LeaseEvent_Kind.KIND_ACQUIRED, pb.LeaseEvent_Kind.KIND_CONTENDED, pb.LeaseEvent_Kind.KIND_RELEASED]));
  });

  it('withLease: the holder releases in sanlock itself and tells the lease-manager; another host takes the lease then', async () => {
    const [h1, h2] = await Promise.all([holder(1), holder(2)]);
    const loc = domain.location('R-own');
    // Two holds in one go (the second acquire takes the first release's notice along), then one more
    // (its notice went on its own, right after the release).
    for (const times of [2, 1]) {
      const held = await h1.hold(loc, 'exclusive', 'op-own', times);
      expect(held.ok).toBe(true);
      if (!held.ok) return;
      expect(held.result.heldInside.map((r) => r.name)).toEqual(['R-own']);
      expect(held.result.heldAfter).toEqual([]);
    }
    await waitFor(
      "the lease-manager's table without it",
      async () => ((await cluster.host(1).client.listHeldLeases({})).leases.some((l) => l.location?.resource === 'R-own') ? undefined : true),
      10000,
      100,
    );
    const other = await h2.acquire(loc, 'exclusive');
    expect(other.ok).toBe(true);
    expect((await h2.release(loc)).ok).toBe(true);
    const kinds = await waitFor(
      "host 1's events of both holds",
      async () => {
        const k = cluster
          .eventsOf('lease')
          .filter((e) => e.lease.lease?.resource === 'R-own' && e.lease.hostId === 1)
          .map((e) => pb.LeaseEvent_Kind[e.lease.kind]);
        return k.length >= 6 ? k : undefined;
      },
      10000,
      100,
    );
    expect(kinds).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED', 'KIND_RELEASED']);
  });

  it('shared: several hosts hold it at once; exclusive is refused while any shared holder remains', async () => {
    const [h1, h2, h3] = await Promise.all([holder(1), holder(2), holder(3)]);
    const loc = domain.location('R-shared');
    expect((await h1.acquire(loc, 'shared')).ok).toBe(true);
    expect((await h2.acquire(loc, 'shared')).ok).toBe(true);
    const refused = await h3.acquire(loc, 'exclusive');
    expect(refused.ok).toBe(false);
    if (!refused.ok) {
      expect(refused.error.code).toBe(GrpcStatus.ABORTED);
      expect(refused.error.message).toMatch(/host ids? .*1/);
    }
    expect((await h1.release(loc)).ok).toBe(true);
    const stillRefused = await h3.acquire(loc, 'exclusive');
    expect(stillRefused.ok).toBe(false);
    if (!stillRefused.ok) expect(stillRefused.error.message).toMatch(/host id 2\b/);
    expect((await h2.release(loc)).ok).toBe(true);
    const got = await h3.acquire(loc, 'exclusive');
    expect(got.ok).toBe(true);
    expect((await h3.release(loc)).ok).toBe(true);
  });

  it('holder death: a SIGKILLed holder loses its lease without any clean-up', async () => {
    const [h1, h2] = await Promise.all([holder(1), holder(2)]);
    const loc = domain.location('R-death');
    expect((await h1.acquire(loc, 'exclusive', { operationId: 'doomed' })).ok).toBe(true);
    expect((await h2.acquire(loc, 'exclusive')).ok).toBe(false);
    await h1.kill('SIGKILL');
    const got = await waitFor(
      'the lease to be free after the holder died',
      async () => ((await h2.acquire(loc, 'exclusive')).ok ? true : undefined),
      10000,
      50,
    );
    expect(got).toBe(true);
    // The lease-manager of host 1 notices the holder is gone and reports the release.
    await waitFor('host 1 to drop the dead holder', async () => ((await cluster.host(1).client.listHeldLeases({})).leases.length === 0 ? true : undefined));
    await waitFor('the released event', () =>
      cluster
        .eventsOf('lease')
        .some((e) => e.lease.kind === pb.LeaseEvent_Kind.KIND_RELEASED && e.lease.operationId === 'doomed' && /exited/.test(e.lease.reason))
        ? true
        : undefined,
    );
    expect((await h2.release(loc)).ok).toBe(true);
  });

  it('bad inputs get the documented status codes and leave no lease behind', async () => {
    const h1 = await holder(1);
    const c = cluster.host(1).client;
    const loc = domain.location('R-bad');
    const code = async (p: Promise<unknown>) => {
      const e = await p.then(
        () => undefined,
        (err: SdmeshError) => err,
      );
      return e ? [GrpcStatus[e.code], e.reason] : ['OK'];
    };
    const acquire = (lease: Partial<pb.LeaseLocation>, extra: Partial<pb.AcquireLeaseRequest> = {}) =>
      code(c.acquireLease({ lease: { ...loc, ...lease }, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: h1.pid, ...extra }));
    expect(await acquire({ resource: '' })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ resource: 'x'.repeat(49) })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ resource: '../etc' })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ offset: -1048576 })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ offset: 4096 })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ path: 'relative/leases' })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ path: domain.leases + '/../x' })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({}, { mode: pb.LeaseMode.LEASE_MODE_UNSPECIFIED })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({ lockspace: 'no-such-lockspace' })).toEqual(['FAILED_PRECONDITION', 'LOCKSPACE_NOT_JOINED']);
    // The test runner itself (the caller: pid 0 or its own pid) is alive but not registered with sanlock.
    expect(await acquire({}, { holderPid: 0 })).toEqual(['FAILED_PRECONDITION', 'HOLDER_NOT_REGISTERED']);
    expect(await acquire({}, { holderPid: process.pid })).toEqual(['FAILED_PRECONDITION', 'HOLDER_NOT_REGISTERED']);
    // An offset where no lease was formatted.
    expect(await acquire({ offset: 64 * 1024 * 1024 })).toEqual(['FAILED_PRECONDITION', 'LEASE_AREA_INVALID']);
    // Double release.
    expect(await code(c.releaseLease({ lease: loc, holderPid: h1.pid }))).toEqual(['FAILED_PRECONDITION', 'LEASE_NOT_HELD']);
    // A holder's own release notice must name the grant it released (never forgets a newer one).
    expect(await code(c.releaseLease({ lease: loc, holderPid: h1.pid, releasedByHolder: true }))).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await acquire({}, { released: [{ lease: loc, holderPid: h1.pid, releasedByHolder: true, acquireTime: undefined }] })).toEqual([
      'INVALID_ARGUMENT',
      'INVALID_ARGUMENT',
    ]);
    expect(await code(c.listLockspaceHosts({ lockspace: 'nope' }))).toEqual(['FAILED_PRECONDITION', 'LOCKSPACE_NOT_JOINED']);
    expect(await code(c.joinLockspace({ lockspace: 'bad name!', path: domain.ids }))).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await code(c.joinLockspace({ lockspace: LS, path: domain.ids, hostId: 2 }))).toEqual(['FAILED_PRECONDITION', 'HOST_ID_MISMATCH']);

    expect((await c.listHeldLeases({})).leases).toEqual([]);
    expect((await c.getLeaseOwner({ lease: loc })).ownerHostIds).toEqual([]);
    const held = await h1.held();
    expect(held.ok && held.result).toEqual([]);
  });

  it('exposes lease metrics', async () => {
    const res = await fetch(`http://127.0.0.1:${cluster.host(2).leaseManager.metricsPort}/metrics`);
    const text = await res.text();
    expect(text).toMatch(/sdmesh_lease_acquire_seconds_count\{[^}]*mode="exclusive",result="ok"[^}]*\} [1-9]/);
    expect(text).toMatch(/sdmesh_lease_contention_total\{[^}]*lockspace="ls-main"[^}]*\} [1-9]/);
    expect(text).toMatch(/sdmesh_lockspace_state\{[^}]*lockspace="ls-main",state="JOINED"[^}]*\} 1/);
    expect(text).toContain('sdmesh_leases_held');
  });

  it('lockspace loss on a live host: its holders are stopped and lease-lost events published', async () => {
    // A lockspace only host 3 joins, on its own ids file, which we then destroy.
    const lost = await cluster.formatDomain('ls-lost', ['R-lost']);
    const h3c = cluster.host(3).client;
    await h3c.joinLockspace({ lockspace: 'ls-lost', path: lost.ids, wait: true }, { timeoutMs: 60000 });
    const h3 = await holder(3);
    expect((await h3.acquire(lost.location('R-lost'), 'exclusive', { operationId: 'will-be-fenced' })).ok).toBe(true);
    const started = Date.now();
    fs.truncateSync(lost.ids, 0); // renewals now fail: the storage "went away" for this lockspace
    const code = await h3.proc.exited;
    const fencedAfter = Date.now() - started;
    expect(code).toBe('SIGKILL'); // our kill path: `kill -KILL <pid>`, run by sanlock
    expect(fencedAfter).toBeLessThan(60000);
    await waitFor(
      'lockspace-lost and lease-lost events',
      () =>
        cluster.eventsOf('lockspace').some((e) => e.lockspace.kind === pb.LockspaceEvent_Kind.KIND_LOST && e.lockspace.lockspace === 'ls-lost') &&
        cluster.eventsOf('lease').some((e) => e.lease.kind === pb.LeaseEvent_Kind.KIND_LOST && e.lease.operationId === 'will-be-fenced')
          ? true
          : undefined,
      20000,
    );
    const ls = await h3c.getLockspace({ lockspace: 'ls-lost' });
    expect(ls.state).toBe(pb.LockspaceState.LOCKSPACE_STATE_LOST);
    // Host 3 keeps working in the other lockspace.
    expect((await h3c.getLockspace({ lockspace: LS })).state).toBe(pb.LockspaceState.LOCKSPACE_STATE_JOINED);
  });

  it("host death: a dead host's lease becomes acquirable only after sanlock's dead-host timeout", async () => {
    const [h1, h2] = await Promise.all([holder(1), holder(2)]);
    const loc = domain.location('R-hostdeath');
    expect((await h2.acquire(loc, 'exclusive', { operationId: 'on-dying-host' })).ok).toBe(true);
    const killedAt = Date.now();
    await cluster.host(2).sanlock.stop('SIGKILL');
    // Without its daemon the holder can't be fenced by sanlock: it fences itself on hang-up.
    expect(await h2.proc.exited).toBe('SIGKILL');
    let refusals = 0;
    let lastRefusalAt = 0;
    let acquiredAt = 0;
    while (Date.now() - killedAt < 150000) {
      const r = await h1.acquire(loc, 'exclusive');
      if (r.ok) {
        acquiredAt = Date.now();
        break;
      }
      expect(r.error.reason).toBe('LEASE_HELD');
      expect(r.error.message).toMatch(/host id 2\b/);
      refusals++;
      lastRefusalAt = Date.now();
      await new Promise((res) => setTimeout(res, 1000));
    }
    const secondsUntilFree = (acquiredAt - killedAt) / 1000;
    const lastRefusalSeconds = (lastRefusalAt - killedAt) / 1000;
    process.stdout.write(
      `host death: refused ${refusals} times, last refusal at ${lastRefusalSeconds.toFixed(1)} s, acquired at ${secondsUntilFree.toFixed(1)} s\n`,
    );
    expect(acquiredAt).toBeGreaterThan(0);
    // sanlock: host_dead = 8·io_timeout + watchdog timeout (60 s) ≈ 68 s at io_timeout 1.
    expect(secondsUntilFree).toBeGreaterThanOrEqual(60);
    expect(lastRefusalSeconds).toBeGreaterThan(50);
    // Host 2's lease-manager noticed its daemon is gone.
    await waitFor('lease-lost on host 2', () =>
      cluster.eventsOf('lease').some((e) => e.lease.kind === pb.LeaseEvent_Kind.KIND_LOST && e.lease.operationId === 'on-dying-host') ? true : undefined,
    );
    const { hosts } = await cluster.host(1).client.listLockspaceHosts({ lockspace: LS });
    expect(hosts.find((h) => h.hostId === 2)?.liveness).toBe(pb.HostLiveness.HOST_LIVENESS_DEAD);
    expect((await h1.release(loc)).ok).toBe(true);
  });
});
