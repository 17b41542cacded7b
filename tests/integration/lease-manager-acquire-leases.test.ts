import { GrpcStatus, pb, SdmeshError } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { LeaseCluster } from '../harness/lease-cluster';
import { TestLeaseHolder } from '../harness/lease-holder';

/**
 * AcquireLeases (issue 17, the copy's fixed cost) against real sanlock: 2 simulated hosts, two
 * lockspaces (a copy's source domain and destination domain). One sanlock acquire takes the
 * source's lease shared and the destination's exclusive, all or none.
 */
describe('AcquireLeases with 2 sanlock hosts and two lockspaces', () => {
  const cluster = new LeaseCluster();
  const holders: TestLeaseHolder[] = [];
  let source: pb.LeaseLocation;
  let destination: pb.LeaseLocation;

  const holder = async (hostId: number) => {
    const h = cluster.host(hostId);
    const t = await TestLeaseHolder.start(h.sanlock.env, h.leaseSocket);
    holders.push(t);
    return t;
  };
  const copyLeases = () => [
    { location: source, mode: 'shared' as const },
    { location: destination, mode: 'exclusive' as const },
  ];
  const heldOnHost1 = async (pid: number) => (await cluster.host(1).client.listHeldLeases({ holderPid: pid })).leases;

  beforeAll(async () => {
    await cluster.start(2);
    const src = await cluster.formatDomain('ls-src', ['R-src']);
    const dst = await cluster.formatDomain('ls-dst', ['R-dst']);
    source = src.location('R-src');
    destination = dst.location('R-dst');
    await Promise.all(
      cluster.hosts.flatMap((h) =>
        [
          ['ls-src', src.ids],
          ['ls-dst', dst.ids],
        ].map(([lockspace, path]) => h.client.joinLockspace({ lockspace, path, wait: true }, { timeoutMs: 60000 })),
      ),
    );
  });
  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill()));
    await cluster.stop();
  });

  it("takes the source shared (beside another host's reader) and the destination exclusive in one call; releases both itself", async () => {
    const [h1, h2] = await Promise.all([holder(1), holder(2)]);
    // Host 2 reads the source: a shared acquire of host 1 succeeds beside it only if the source really is asked for shared.
    expect((await h2.acquire(source, 'shared')).ok).toBe(true);
    const held = await h1.holdMany(copyLeases(), 'copy-1');
    expect(held.ok).toBe(true);
    if (!held.ok) return;
    const { granted, heldInside, tableInside, heldAfter } = held.result;
    expect(granted.map((l) => [l.location?.lockspace, l.location?.resource, l.mode, l.operationId, l.holderPid])).toEqual([
      ['ls-src', 'R-src', pb.LeaseMode.LEASE_MODE_SHARED, 'copy-1', h1.pid],
      ['ls-dst', 'R-dst', pb.LeaseMode.LEASE_MODE_EXCLUSIVE, 'copy-1', h1.pid],
    ]);
    expect(Number(granted[1]!.lver)).toBeGreaterThan(0);
    // sanlock itself: this process holds both, each in its own mode.
    expect(heldInside.map((r) => [r.lockspace, r.name, r.shared]).sort()).toEqual([
      ['ls-dst', 'R-dst', false],
      ['ls-src', 'R-src', true],
    ]);
    expect(tableInside.map((l) => [l.location?.resource, l.mode]).sort()).toEqual([
      ['R-dst', pb.LeaseMode.LEASE_MODE_EXCLUSIVE],
      ['R-src', pb.LeaseMode.LEASE_MODE_SHARED],
    ]);
    // Released in sanlock by the holder, and the lease-manager told (its table, RELEASED events).
    expect(heldAfter).toEqual([]);
    await waitFor('host 1 table without the copy leases', async () => ((await heldOnHost1(h1.pid)).length ? undefined : true), 10000, 50);
    const kinds = (resource: string) =>
      cluster
        .eventsOf('lease')
        .filter((e) => e.lease.lease?.resource === resource && e.lease.holderPid === h1.pid)
        .map((e) => e.lease.kind);
    await waitFor('ACQUIRED and RELEASED of both', async () => (kinds('R-src').length >= 2 && kinds('R-dst').length >= 2 ? true : undefined), 10000, 50);
    for (const r of ['R-src', 'R-dst']) expect(kinds(r)).toEqual([pb.LeaseEvent_Kind.KIND_ACQUIRED, pb.LeaseEvent_Kind.KIND_RELEASED]);
    expect((await h2.release(source)).ok).toBe(true);
  });

  it('all or none: a destination another host holds fails the call naming it, and the source is not kept; then both are taken', async () => {
    const [h1, h2] = await Promise.all([holder(1), holder(2)]);
    expect((await h2.acquire(destination, 'exclusive')).ok).toBe(true);
    const refused = await h1.holdMany(copyLeases(), 'copy-2');
    expect(refused.ok).toBe(false);
    if (refused.ok) return;
    expect([refused.error.code, refused.error.reason]).toEqual([GrpcStatus.ABORTED, 'LEASE_HELD']);
    expect(refused.error.message).toMatch(/lease "R-dst" of lockspace "ls-dst" .*held \(exclusive\) by host id 2\b/);
    // Nothing held by the caller, in sanlock or in the table; the source's lease area names no owner.
    const nothing = await h1.held();
    expect(nothing.ok && nothing.result).toEqual([]);
    expect(await heldOnHost1(h1.pid)).toEqual([]);
    expect((await cluster.host(2).client.getLeaseOwner({ lease: source })).ownerHostIds).toEqual([]);

    expect((await h2.release(destination)).ok).toBe(true);
    const held = await h1.holdMany(copyLeases(), 'copy-2');
    expect(held.ok && held.result.granted.map((l) => l.location?.resource)).toEqual(['R-src', 'R-dst']);
  });

  it('in one process, a second withLeases of the same leases waits for the first, one that does not wait is refused at once', async () => {
    const h1 = await holder(1);
    const held = await h1.holdManyOverlapping(copyLeases());
    expect(held.ok && held.result).toEqual({ order: ['first in', 'first out', 'second in', 'second out'], third: 'LEASE_HELD_ON_THIS_HOST' });
    const nothing = await h1.held();
    expect(nothing.ok && nothing.result).toEqual([]);
  });

  it('refuses no lease, more than 8, a lease twice, an unknown mode, and another process as holder, taking nothing', async () => {
    const client = cluster.host(1).client;
    const codeOf = (req: Partial<pb.AcquireLeasesRequest>) =>
      client.acquireLeases({ holderPid: 0, operationId: 'x', ...req }).then(
        () => 'OK',
        (err: unknown) => {
          const e = SdmeshError.from(err);
          return `${GrpcStatus[e.code]}: ${e.message}`;
        },
      );
    const shared = (resource: string, i: number) => ({ lease: { ...source, resource, offset: i * 1024 * 1024 }, mode: pb.LeaseMode.LEASE_MODE_SHARED });
    expect(await codeOf({ leases: Array.from({ length: 9 }, (_, i) => shared(`R-${i}`, i)) })).toMatch(/^INVALID_ARGUMENT: leases: at most 8 per call/);
    expect(await codeOf({ leases: [shared('R-src', 0), { lease: source, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE }] })).toMatch(
      /^INVALID_ARGUMENT: leases: lease "R-src" .* asked for twice/,
    );
    expect(await codeOf({ leases: [] })).toMatch(/^INVALID_ARGUMENT: leases: give at least one lease/);
    expect(await codeOf({ leases: [{ lease: source, mode: pb.LeaseMode.LEASE_MODE_UNSPECIFIED }] })).toMatch(/^INVALID_ARGUMENT: .*leases\[0\]\.mode/);
    // The local caller may act only for itself and its children, not for another process of the host (pid 1).
    expect(await codeOf({ leases: [{ lease: source, mode: pb.LeaseMode.LEASE_MODE_SHARED }], holderPid: 1 })).toMatch(
      /^PERMISSION_DENIED: holder_pid 1 is neither/,
    );
    expect((await client.listHeldLeases({})).leases).toEqual([]);
  });
});
