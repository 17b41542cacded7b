import fs from 'node:fs';
import { localLeaseManagerClient, MAX_HOST_ID, parseLeaderRecord, pb, readLeaderSector, Reason, SdmeshError } from '@sdmesh/common';
import { DomainLeaseGroups } from '../../services/metadata-tx/src/group-commit';
import { lookAtDomainLease } from '../../services/metadata-tx/src/lease-look';
import type { DomainLeaseProvider, DomainRef } from '../../services/metadata-tx/src/leases';
import { DomainLeaseHosts } from '../harness/domain-lease-hosts';
import type { TestLeaseHolder } from '../harness/lease-holder';

/**
 * A host waiting for a domain's metadata lease learns of its release from a look at the lease
 * on storage (services/metadata-tx/src/lease-look.ts), with real sanlock: two hosts, each a
 * sanlock daemon and a lease-manager; the lease taken by lease-holder processes on each.
 */
describe('waiting for the domain lease: looks at the lease on storage, polling as the fallback (real sanlock)', () => {
  let hosts: DomainLeaseHosts;
  let holders: TestLeaseHolder[];
  let domain: DomainRef;
  let domainId: string;
  let sdm: pb.LeaseLocation;

  beforeAll(async () => {
    hosts = await DomainLeaseHosts.start('mdtx-look');
    ({ holders, domain, sdm } = hosts);
    domainId = domain.id;
  });
  afterAll(async () => {
    await hosts?.stop();
  });

  /** The domain lease taken and given back by host 1's lease holder process, as tryDomainLease, its tries and refusals counted. */
  const host1Provider = (): DomainLeaseProvider & { tries: number; refused: number } => {
    const provider: DomainLeaseProvider & { tries: number; refused: number } = Object.assign(
      hosts.providerOf(0, { onTry: () => provider.tries++, onRefused: () => provider.refused++ }),
      { tries: 0, refused: 0 },
    );
    return provider;
  };

  it('the look shows what sanlock did: held by host 2 at the version of its acquire, then free at that version', async () => {
    const got = await holders[1]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 }); // after the last test's hold ended
    if (!got.ok) throw new Error(got.error.message);
    expect(await lookAtDomainLease(domain)).toEqual({ free: false, lver: got.result.lver, ownerHostId: 2 });
    await holders[1]!.release(sdm);
    expect(await lookAtDomainLease(domain)).toEqual({ free: true, lver: got.result.lver, ownerHostId: 0 });
  });

  it("sanlock's leader record names the lockspace and the resource; the lease-manager, seeing that, asks sanlock and refuses to format the area while host 2 holds it", async () => {
    const got = await holders[1]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 });
    if (!got.ok) throw new Error(got.error.message);
    const fd = fs.openSync(sdm.path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
    const leaseManager = localLeaseManagerClient(`unix:${hosts.mesh.leaseSocket(hosts.mesh.hosts[0]!.name)}`);
    try {
      expect(parseLeaderRecord(await readLeaderSector(fd, 0))).toEqual({
        lockspace: domainId,
        resource: 'SDM',
        ownerHostId: 2,
        lver: got.result.lver,
        free: false,
        numHosts: MAX_HOST_ID,
      });
      const refused = await leaseManager.formatLeases({ lockspace: domainId, path: sdm.path, leases: [{ resource: 'SDM', offset: 0 }] }).then(
        () => undefined,
        (err: unknown) => SdmeshError.from(err),
      );
      expect(refused?.reason).toBe(Reason.LEASE_AREA_IN_USE);
    } finally {
      leaseManager.close();
      fs.closeSync(fd);
      await holders[1]!.release(sdm);
    }
  });

  it('a waiter on host 1 gets the lease once host 2 releases it, told by its look (its poll alone would take minutes)', async () => {
    const got = await holders[1]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 }); // after the last test's hold ended
    if (!got.ok) throw new Error(got.error.message);
    const provider = host1Provider();
    const groups = new DomainLeaseGroups(provider, { hostId: 1, pollMs: 60_000 });
    const ran = groups.run(domain, 'waiter', async (hold) => hold.lease.lver);
    // Its first try refused (under load that answer can take a while), then 300 ms of looks only.
    for (let waited = 0; provider.refused < 1 && waited < 60_000; waited += 20) await new Promise((resolve) => setTimeout(resolve, 20));
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(provider.tries).toBe(1); // refused once; since then only looking
    await holders[1]!.release(sdm);
    expect(await ran).toBe(got.result.lver + 1);
    expect(provider.tries).toBe(2);
  });

  it('a lost notice (the looks never show the release) costs only the poll: the waiter still gets the lease', async () => {
    const got = await holders[1]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 }); // after the last test's hold ended
    if (!got.ok) throw new Error(got.error.message);
    const provider = host1Provider();
    const neverReleased = async () => ({ free: false, lver: got.result.lver, ownerHostId: 2 });
    const groups = new DomainLeaseGroups(provider, { hostId: 1, pollMs: 10, watchedPollFactor: 2, lookAtLease: neverReleased });
    const ran = groups.run(domain, 'waiter', async (hold) => hold.lease.lver);
    await new Promise((resolve) => setTimeout(resolve, 300));
    await holders[1]!.release(sdm);
    expect(await ran).toBe(got.result.lver + 1);
    expect(provider.tries).toBeGreaterThan(2); // refused while held, polled on
  });
});
