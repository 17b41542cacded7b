import fs from 'node:fs';
import { readLeaderSector } from '@sdmesh/common';
import { DomainLeaseGroups, type HoldRecord } from '../../services/metadata-tx/src/group-commit';
import { isDomainLeaseWanted, parseRequestRecord } from '../../services/metadata-tx/src/lease-look';
import { DomainLeaseHosts } from '../harness/domain-lease-hosts';

/**
 * A host that starts waiting for a domain's metadata lease while another host holds it with the
 * wide "solo" bounds gets it after at most one normal batch of the holder: its refused try leaves
 * a request in the lease area (the lease-manager's sanlock_request, no force), and the holder
 * reads it between batches (services/metadata-tx/src/group-commit.ts, lease-look.ts). Real
 * sanlock: two hosts, each a sanlock daemon and a lease-manager; the lease taken by lease-holder
 * processes on each, the group commit of each host run here.
 */
describe('the domain lease is asked for by a waiting host, and a solo holder gives it up after one normal batch (real sanlock)', () => {
  let hosts: DomainLeaseHosts;
  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  beforeAll(async () => {
    hosts = await DomainLeaseHosts.start('mdtx-request');
  });
  afterAll(async () => {
    await hosts?.stop();
  });

  /** The request record as sanlock wrote it: the sector after the leader (512-byte sectors here). */
  const requestedVersion = async () => {
    const fd = fs.openSync(hosts.sdm.path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
    try {
      return parseRequestRecord((await readLeaderSector(fd, 0)).subarray(512, 1024));
    } finally {
      fs.closeSync(fd);
    }
  };

  it("a refused try with request_if_held leaves sanlock's request for the next version, which the holder reads; a plain refused try leaves none", async () => {
    const { holders, sdm, domain } = hosts;
    const held = await holders[1]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 });
    if (!held.ok) throw new Error(held.error.message);
    const lver = held.result.lver;
    try {
      const plain = await holders[0]!.acquire(sdm, 'exclusive', { wait: false });
      expect(plain.ok).toBe(false);
      expect(await isDomainLeaseWanted(domain, lver)).toBe(false);
      const asking = await holders[0]!.acquire(sdm, 'exclusive', { wait: false, requestIfHeld: true });
      expect(asking.ok ? undefined : asking.error.reason).toBe('LEASE_HELD');
      expect(await requestedVersion()).toBe(lver + 1);
      expect(await isDomainLeaseWanted(domain, lver)).toBe(true);
    } finally {
      await holders[1]!.release(sdm);
    }
    // The next holder, at the version asked for, is told of it too (someone wanted what it took); the one after is not.
    const next = await holders[0]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 });
    if (!next.ok) throw new Error(next.error.message);
    expect(next.result.lver).toBe(lver + 1);
    expect(await isDomainLeaseWanted(domain, lver + 1)).toBe(true);
    await holders[0]!.release(sdm);
    const after = await holders[0]!.acquire(sdm, 'exclusive', { wait: true, timeoutMs: 60000 });
    if (!after.ok) throw new Error(after.error.message);
    expect(await isDomainLeaseWanted(domain, after.result.lver)).toBe(false);
    await holders[0]!.release(sdm);
  });

  it('host 2 starts waiting while host 1 holds solo with work queued: host 1 starts at most one normal batch (4) more, then host 2 holds', async () => {
    const { domain } = hosts;
    const log: string[] = [];
    const holds: (HoldRecord & { host: number })[] = [];
    const groupsOf = (n: number) =>
      new DomainLeaseGroups(
        hosts.providerOf(n, { requestIfHeld: true, onRefused: () => log.push(`host ${n + 1} requested`) }),
        // Bounds no clock reaches: only counts (and the request) end a hold.
        {
          hostId: n + 1,
          maxBatch: 4,
          maxHoldMs: 600_000,
          soloBatch: 100_000,
          soloHoldMs: 600_000,
          maxWaitMs: 60_000,
          onHold: (h) => holds.push({ ...h, host: n + 1 }),
        },
      );
    const host1 = groupsOf(0);
    const host2 = groupsOf(1);
    let stop = false;
    const stream = async () => {
      for (let i = 0; !stop; i++) {
        await host1.run(domain, `h1-${i}`, async () => {
          log.push('host 1');
          await sleep(2);
        });
      }
    };
    const streams = Promise.all(Array.from({ length: 8 }, stream));
    // Host 1's first hold has no earlier version to compare with (normal bound); its second is
    // solo. Host 2 starts once that one ran 12 transactions (3 normal batches: the holder read
    // the lease area at 4 and 8 and found nobody asking).
    while (!(holds.length >= 1 && log.length >= holds[0]!.transactions + 12)) await sleep(5);
    const waiterRan = host2.run(domain, 'h2', async () => void log.push('host 2'));
    await waiterRan;
    stop = true;
    await streams;
    while (holds.filter((h) => h.host === 1).length < 3) await sleep(5); // host 1's hold after host 2's has ended

    const soloHold = holds.find((h) => h.host === 1 && h.solo)!;
    expect(soloHold).toMatchObject({ solo: true, requested: true, ended: 'bound' });
    expect(soloHold.transactions).toBeGreaterThanOrEqual(12);
    const asked = log.indexOf('host 2 requested');
    const served = log.indexOf('host 2');
    expect(asked).toBeGreaterThan(0);
    expect(served).toBeGreaterThan(asked);
    // Transactions host 1 started after host 2's request was on storage: at most one normal batch.
    expect(log.slice(asked, served).filter((e) => e === 'host 1').length).toBeLessThanOrEqual(4);
    // Host 2's hold came right after that solo hold, and no two holds overlapped.
    const ordered = [...holds].sort((a, b) => a.acquiredAt - b.acquiredAt);
    expect(ordered[ordered.indexOf(soloHold) + 1]!.host).toBe(2);
    for (const [i, h] of ordered.entries()) if (i > 0) expect(h.acquiredAt).toBeGreaterThanOrEqual(ordered[i - 1]!.releasedAt);
  });
});
