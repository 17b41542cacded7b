import { GrpcStatus, pb } from '@sdmesh/common';
import { LeaseFramesClient, leaseFramesSocketPath } from '@sdmesh/common/internal';
import { waitFor } from '@sdmesh/localmesh';
import { LeaseCluster } from '../harness/lease-cluster';
import { TestLeaseHolder } from '../harness/lease-holder';

/**
 * The lease frame socket (lease-frames.ts) of a real lease-manager over a real sanlock daemon:
 * holders here use it only (SDMESH_LEASE_TRANSPORT=frames: no silent fallback to gRPC), and this
 * test process calls it as a local peer.
 */
describe('lease-manager: the lease frame socket', () => {
  const cluster = new LeaseCluster();
  const holders: TestLeaseHolder[] = [];
  let domain: Awaited<ReturnType<LeaseCluster['formatDomain']>>;
  let frames: LeaseFramesClient;
  const LS = 'ls-frames';

  const holder = async () => {
    const h = cluster.host(1);
    const t = await TestLeaseHolder.start({ ...h.sanlock.env, SDMESH_LEASE_TRANSPORT: 'frames' }, h.leaseSocket);
    holders.push(t);
    return t;
  };
  /** Leases the lease-manager's table gives this pid. */
  const tableOf = async (pid: number) => (await cluster.host(1).client.listHeldLeases({ holderPid: pid })).leases.map((l) => l.location?.resource);

  beforeAll(async () => {
    await cluster.start(1);
    domain = await cluster.formatDomain(LS, ['R-hold', 'R-denied', 'R-killed', 'R-deadline', 'R-cancel']);
    await cluster.host(1).client.joinLockspace({ lockspace: LS, path: domain.ids, wait: true }, { timeoutMs: 60000 });
    frames = new LeaseFramesClient(leaseFramesSocketPath(cluster.host(1).leaseSocket.slice('unix:'.length)));
  });
  afterAll(async () => {
    frames.close();
    await Promise.all(holders.map((h) => h.kill()));
    await cluster.stop();
  });

  it('acquire and release: granted in sanlock with its lver, released by the holder, the table follows', async () => {
    const h = await holder();
    const loc = domain.location('R-hold');
    const held = await h.hold(loc, 'exclusive', 'op-frames', 2);
    expect(held.ok).toBe(true);
    if (!held.ok) return;
    expect(held.result.lease.lver).toBeGreaterThan(0);
    expect(held.result.heldInside.map((r) => r.name)).toEqual(['R-hold']);
    expect(held.result.heldAfter).toEqual([]);
    await waitFor('the release notice to reach the table', async () => ((await tableOf(h.pid)).length === 0 ? true : undefined), 10_000, 50);
    const grant = await h.acquire(loc, 'exclusive', { operationId: 'op-plain' });
    expect(grant.ok && grant.result.holderPid).toBe(h.pid);
    expect(await tableOf(h.pid)).toEqual(['R-hold']);
    expect((await h.release(loc)).ok).toBe(true);
    expect(await tableOf(h.pid)).toEqual([]);
    expect(await h.held()).toMatchObject({ ok: true, result: [] });
  });

  it('refuses a caller acting for a process that is neither itself nor its child: PERMISSION_DENIED, nothing taken', async () => {
    const loc = domain.location('R-denied');
    const err = await frames
      .calls()
      .acquireLease({ lease: loc, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: 1, operationId: 'not-mine' })
      .catch((e: unknown) => e);
    expect(err).toMatchObject({ code: GrpcStatus.PERMISSION_DENIED, reason: 'NOT_HOLDER' });
    expect(await tableOf(1)).toEqual([]);
    expect((await cluster.host(1).client.getLeaseOwner({ lease: loc })).ownerHostIds).toEqual([]);
  });

  it('a holder killed during its hold leaves no lease', async () => {
    const [doomed, next] = [await holder(), await holder()];
    const loc = domain.location('R-killed');
    expect((await doomed.acquire(loc, 'exclusive', { operationId: 'doomed' })).ok).toBe(true);
    expect(await next.acquire(loc, 'exclusive')).toMatchObject({ ok: false, error: { code: GrpcStatus.ABORTED } });
    await doomed.kill('SIGKILL');
    expect(
      await waitFor('the lease to be free after its holder died', async () => ((await next.acquire(loc, 'exclusive')).ok ? true : undefined), 20_000, 50),
    ).toBe(true);
    await waitFor('the dead holder dropped from the table', async () => ((await tableOf(doomed.pid)).length === 0 ? true : undefined), 20_000, 100);
    expect((await next.release(loc)).ok).toBe(true);
  });

  it('a waiting acquire ends at its deadline (DEADLINE_EXCEEDED) or its cancel (CANCELLED), and nothing is granted after', async () => {
    const [owner, waiter] = [await holder(), await holder()];
    const onDeadline = domain.location('R-deadline');
    const onCancel = domain.location('R-cancel');
    for (const loc of [onDeadline, onCancel]) expect((await owner.acquire(loc, 'exclusive')).ok).toBe(true);
    const timedOut = await waiter.acquire(onDeadline, 'exclusive', { wait: true, timeoutMs: 1500 });
    expect(timedOut).toMatchObject({ ok: false, error: { code: GrpcStatus.DEADLINE_EXCEEDED } });
    // This process acts for its child, the waiter (allowed: a process may act for its children), and gives up.
    const controller = new AbortController();
    const cancelled = frames
      .calls()
      .acquireLease(
        { lease: onCancel, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: waiter.pid, operationId: 'given-up', wait: true },
        { signal: controller.signal },
      )
      .catch((e: unknown) => e);
    setTimeout(() => controller.abort(), 1000);
    expect(await cancelled).toMatchObject({ code: GrpcStatus.CANCELLED });
    for (const loc of [onDeadline, onCancel]) expect((await owner.release(loc)).ok).toBe(true);
    // The lease-manager stopped waiting for both: once free, neither lease becomes the waiter's.
    await new Promise((r) => setTimeout(r, 3000));
    expect(await waiter.held()).toMatchObject({ ok: true, result: [] });
    expect(await tableOf(waiter.pid)).toEqual([]);
  });
});
