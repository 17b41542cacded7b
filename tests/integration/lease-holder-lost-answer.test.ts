import path from 'node:path';
import { GrpcStatus, pb } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { AnswerLosingProxy } from '../harness/answer-losing-proxy';
import { LeaseCluster } from '../harness/lease-cluster';
import { TestLeaseHolder } from '../harness/lease-holder';

/**
 * The holder's half of 75e46e2 against real sanlock and a real lease-manager: an acquire the
 * lease-manager granted and answered, whose answer never reached the holder (the connection
 * dropped as it came, or the call's deadline passed while it was on its way), ends in an error
 * for the holder. sanlock gives the lease to the holder all the same; the LeaseHolder must find
 * it there and release it, or it stays held for the holder's whole life. The lease-manager's own
 * half (a call cancelled before the grant) does not apply: it answered before the answer was lost.
 * An acquire that ended UNAVAILABLE is then tried again (a restarting lease-manager: see
 * lease-manager-restart.test.ts), and must end with one grant, not two, and none left after.
 */
describe('a LeaseHolder whose acquire was granted but whose answer was lost releases the lease (and tries again after UNAVAILABLE)', () => {
  const cluster = new LeaseCluster();
  const holders: TestLeaseHolder[] = [];
  let proxy: AnswerLosingProxy;
  let domain: Awaited<ReturnType<LeaseCluster['formatDomain']>>;
  const LS = 'ls-lost';

  beforeAll(async () => {
    await cluster.start(1);
    domain = await cluster.formatDomain(LS, ['R-dropped', 'R-held-a', 'R-held-b']);
    await cluster.host(1).client.joinLockspace({ lockspace: LS, path: domain.ids, wait: true }, { timeoutMs: 60000 });
    proxy = await AnswerLosingProxy.start(path.join(cluster.dir, 'lost-answer.sock'), cluster.host(1).leaseSocket.slice('unix:'.length));
  });
  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill()));
    await proxy?.stop();
    await cluster.stop();
  });

  /** A holder process whose lease-manager calls go through the proxy (or straight to the lease-manager). */
  const holder = async (through: 'proxy' | 'direct') => {
    const h = cluster.host(1);
    const t = await TestLeaseHolder.start(h.sanlock.env, through === 'proxy' ? proxy.address : h.leaseSocket);
    holders.push(t);
    return t;
  };

  /** The lease is free: nothing in the lease-manager's table, and another process of the host takes it exclusive. */
  const expectFree = async (location: pb.LeaseLocation) => {
    expect((await cluster.host(1).client.listHeldLeases({})).leases.map((l) => l.location?.resource)).not.toContain(location.resource);
    const other = await holder('direct');
    const taken = await other.acquire(location, 'exclusive', { operationId: 'after-lost-answer' });
    expect(taken.ok).toBe(true);
    expect((await other.release(location)).ok).toBe(true);
  };

  it('one lease (AcquireLease): the answer held past the call deadline, the call ends DEADLINE_EXCEEDED, the lease is released', async () => {
    const h = await holder('proxy');
    const location = domain.location('R-dropped');
    proxy.loseNextAnswer('hold');
    // Long enough for the grant to be made and answered well before it under load: the answer, not the grant, is lost.
    const got = await h.acquire(location, 'exclusive', { operationId: 'op-deadline', timeoutMs: 6000 });
    expect(got.ok).toBe(false);
    if (got.ok) return;
    expect(got.error.code).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    expect(proxy.lost).toBe(1);
    const held = await h.held();
    expect(held.ok && held.result).toEqual([]);
    await expectFree(location);
  });

  it('two leases (AcquireLeases, withLeases): the connection drops as the answer comes (UNAVAILABLE), the lost grant is released and the call tried again: each lease held once, by the new grant, nothing after', async () => {
    const h = await holder('proxy');
    const leases = [
      { location: domain.location('R-held-a'), mode: 'shared' as const },
      { location: domain.location('R-held-b'), mode: 'exclusive' as const },
    ];
    const lostBefore = proxy.lost;
    proxy.loseNextAnswer('drop');
    const got = await h.holdMany(leases, 'op-drop');
    if (!got.ok) throw new Error(`holdMany failed: ${got.error.message}`);
    expect(proxy.lost).toBe(lostBefore + 1);
    const { granted, heldInside, tableInside, heldAfter } = got.result;
    expect(granted.map((l) => l.location?.resource)).toEqual(['R-held-a', 'R-held-b']);
    // Inside the hold: each lease once in sanlock, and the lease-manager's table holds the new grants only (times as JSON strings).
    expect(heldInside.map((r) => r.name).sort()).toEqual(['R-held-a', 'R-held-b']);
    const grants = (ls: pb.Lease[]) => ls.map((l) => `${l.location?.resource}@${new Date(l.acquireTime!).getTime()}`).sort();
    expect(grants(tableInside)).toEqual(grants(granted));
    expect(heldAfter).toEqual([]);
    // The lost grant was released before the new one (the lease-manager's events: acquired, released, acquired, released).
    const kinds = (resource: string) =>
      cluster
        .eventsOf('lease')
        .filter((e) => e.lease.lease?.resource === resource && e.lease.holderPid === h.pid)
        .map((e) => pb.LeaseEvent_Kind[e.lease.kind]);
    await waitFor('the release events', () => (kinds('R-held-b').length === 4 ? true : undefined), 10_000, 100);
    for (const { location } of leases) expect(kinds(location.resource)).toEqual(['KIND_ACQUIRED', 'KIND_RELEASED', 'KIND_ACQUIRED', 'KIND_RELEASED']);
    for (const { location } of leases) await expectFree(location);
  });
});
