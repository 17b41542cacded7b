import { aborted, pb, Reason, type DomainRef, type LeaseHolder } from '@sdmesh/common';
import { sanlockLeases } from '../../services/gc/src/leases';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * A LeaseHolder whose leases behave like sanlock's for one registered process: one command at
 * a time for the pid (the lease-manager's acquire for it, its own release), a second one
 * meanwhile refused with EBUSY, which the lease-manager reports as local contention.
 */
function sanlockLikeHolder() {
  let active = 0;
  const refused: string[] = [];
  const granted: string[] = [];
  const command = async (what: string) => {
    if (active > 0) {
      refused.push(what);
      throw aborted(`${what}: busy (EBUSY): another call is active on this registered connection`, Reason.LEASE_HELD_ON_THIS_HOST);
    }
    active++;
    await sleep(2);
    active--;
  };
  const holder = {
    leaseManager: {},
    async withLease<T>(location: pb.LeaseLocation, _mode: string, _op: string, fn: (lease: pb.Lease) => Promise<T>): Promise<T> {
      await command(`acquire ${location.resource}`);
      granted.push(location.resource);
      try {
        return await fn(pb.Lease.fromPartial({ location }));
      } finally {
        await command(`release ${location.resource}`);
      }
    },
  };
  return { holder: holder as unknown as LeaseHolder, refused, granted };
}

describe('gc leases through the lease-manager', () => {
  it("parallel items' volume leases: no acquire or release of this process overlaps another (sanlock refuses a second command per pid)", async () => {
    const { holder, refused, granted } = sanlockLikeHolder();
    const leases = sanlockLeases(holder);
    const domain: DomainRef = { id: 'lockspace', path: '/srv/domain' };
    let working = 0;
    let overlapping = 0;
    await leases.withGcLease(domain, 'op', () =>
      leases.withDomainLease(domain, 'op', async () => {
        await Promise.all(
          Array.from({ length: 16 }, (_, i) =>
            leases.withVolumeLease(
              domain,
              `volume-${i}`,
              3 + i,
              'exclusive',
              'op',
              async () => {
                // The work under the lease (the files) still overlaps that of other items.
                working++;
                overlapping = Math.max(overlapping, working);
                await sleep(5);
                working--;
              },
              { wait: false },
            ),
          ),
        );
      }),
    );
    expect(refused).toEqual([]);
    expect(granted).toHaveLength(18);
    expect(overlapping).toBeGreaterThan(1);
  });
});
