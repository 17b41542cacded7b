import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, DomainLayout, localLeaseManagerClient, MAX_HOST_ID, parseLeaderRecord, pb, readLeaderSector, Reason, SdmeshError } from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';
import { DomainLeaseGroups } from '../../services/metadata-tx/src/group-commit';
import { lookAtDomainLease } from '../../services/metadata-tx/src/lease-look';
import type { DomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { TestLeaseHolder } from '../harness/lease-holder';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * A host waiting for a domain's metadata lease learns of its release from a look at the lease
 * on storage (services/metadata-tx/src/lease-look.ts), with real sanlock: two hosts, each a
 * sanlock daemon and a lease-manager; the lease taken by lease-holder processes on each.
 */
describe('waiting for the domain lease: looks at the lease on storage, polling as the fallback (real sanlock)', () => {
  const dir = makeTestDir('mdtx-look');
  const mesh = new LocalMesh({ dir, hosts: 2, perHostServices: ['lease-manager', 'metadata-tx'], scheduler: false, logLevel: 'warn' });
  const domainId = randomUUID();
  const domainPath = path.join(dir, 'storage', 'dom1');
  const domain = { id: domainId, path: domainPath };
  const sdm: pb.LeaseLocation = { lockspace: domainId, resource: 'SDM', path: new DomainLayout(domainPath).leasesPath, offset: 0 };
  const holders: TestLeaseHolder[] = [];

  beforeAll(async () => {
    await mesh.start();
    const clients = mesh.hosts.map((h) =>
      createClient(pb.MetadataTxServiceDefinition, h.services['metadata-tx']!.grpcAddress, mesh.credentials({ kind: 'scheduler' })),
    );
    await clients[0]!.formatDomain({ domainId, name: 'dom1', path: domainPath, ioTimeoutSeconds: 1 }, { timeoutMs: 60000 });
    // A create from each host joins its lease-manager to the domain's lockspace.
    for (const c of clients) {
      await c.createVolume(
        { domainPath, imageId: randomUUID(), volumeId: randomUUID(), format: pb.VolumeFormat.VOLUME_FORMAT_RAW, capacityBytes: 1 << 20 },
        { timeoutMs: 120000 },
      );
      c.close();
    }
    for (const h of mesh.hosts) holders.push(await TestLeaseHolder.start(h.sanlock.env, `unix:${mesh.leaseSocket(h.name)}`));
  });
  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill()));
    await mesh.stop();
    removeTestDir(dir);
  });

  /** The domain lease taken and given back by host 1's lease holder process, as tryDomainLease. */
  const host1Provider = (): DomainLeaseProvider & { tries: number; refused: number } => {
    const provider = {
      tries: 0,
      refused: 0,
      tryDomainLease: async <T>(_d: unknown, _op: string, fn: (hold: { lver?: number }) => Promise<T>) => {
        provider.tries++;
        const got = await holders[0]!.acquire(sdm, 'exclusive', { wait: false });
        if (!got.ok) {
          provider.refused++;
          throw new SdmeshError(got.error.code, got.error.message, got.error.reason);
        }
        try {
          return await fn({ lver: got.result.lver });
        } finally {
          await holders[0]!.release(sdm);
        }
      },
      withDomainLease: () => Promise.reject(new Error('not used: the groups poll with tryDomainLease')),
      tryVolumeLease: () => Promise.reject(new Error('not used')),
      formatLeaseSlot: () => Promise.reject(new Error('not used')),
      formatDomainLeases: () => Promise.reject(new Error('not used')),
    };
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
    const leaseManager = localLeaseManagerClient(`unix:${mesh.leaseSocket(mesh.hosts[0]!.name)}`);
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
