import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { DEFAULT_FENCE_RETENTION_MS, fenceFileName, findGarbage, isFenceExpired, parseFenceName, pb, Reason } from '@sdmesh/common';
import { GarbageCollector, type GarbageCollectorOptions } from '../../services/gc/src/collector';
import { GcMetrics } from '../../services/gc/src/metrics';
import { encodeFenceRecord } from '../../services/metadata-tx/src/operation-fences';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { FakeGcLeases } from '../harness/gc-fakes';

/**
 * The GC removes expired operation fences (dom_md/fence_<operationId>_<ms>, older than the fence
 * retention) under the domain metadata lease, by the same name parser and expiry rule as
 * metadata-tx's FenceOperation (packages/common/src/storage/fences.ts); live fences and every
 * other name stay. Real files, the fake leases.
 */
const DAY = 24 * 3600_000;

let base: string;
beforeAll(async () => {
  base = await fs.mkdtemp('/var/tmp/sdmesh-gc-fences-unit-');
});
afterAll(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

async function fixture(name: string) {
  const root = path.join(base, name);
  const domainId = randomUUID();
  const leases = new FakeGcLeases();
  const engine = new MetadataTransactions({ leases: leases.domainLeases, registry: new Registry(), hostId: 1 });
  await engine.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId, name, path: root, maxVolumes: 50 }));
  const registry = new Registry();
  const metrics = new GcMetrics(registry);
  const domMd = path.join(root, 'dom_md');
  return {
    root,
    domainId,
    domMd,
    leases,
    engine,
    registry,
    gc: (opts: Partial<GarbageCollectorOptions> = {}) => new GarbageCollector({ leases, hostName: 'host-a', graceMs: 0, batchPauseMs: 0, metrics, ...opts }),
    fenceNames: async () => (await fs.readdir(domMd)).filter((n) => n.startsWith('fence')).sort(),
    /** A fence as FenceOperation writes it, at a given time. */
    writeFence: async (operationId: string, fencedMs: number) => {
      const name = fenceFileName(operationId, fencedMs);
      await fs.writeFile(path.join(domMd, name), encodeFenceRecord({ domainId, operationId, fencedMs, hostId: 2 }));
      return name;
    },
  };
}

describe('expired operation fences and the GC', () => {
  it('the expiry rule is the one of both removers: older than the retention, by the time in the name', () => {
    expect(isFenceExpired(1000, 1000 + DEFAULT_FENCE_RETENTION_MS)).toBe(false);
    expect(isFenceExpired(1000, 1001 + DEFAULT_FENCE_RETENTION_MS)).toBe(true);
    expect(isFenceExpired(5000, 1000, 10)).toBe(false); // from the future: not expired
    expect(DEFAULT_FENCE_RETENTION_MS).toBe(DAY);
  });

  it('a pass removes expired fences under the domain lease and keeps live ones and every other name', async () => {
    const f = await fixture('expired-and-live');
    const now = Date.now();
    const [liveOp, expiredOp, tornOp] = [randomUUID(), randomUUID(), randomUUID()];
    await f.engine.fenceOperation({ domainPath: f.root, operationId: liveOp }); // live, as a rollback writes it
    const expired = await f.writeFence(expiredOp, now - 2 * DAY);
    const torn = fenceFileName(tornOp, now - DAY - 60_000); // a crash mid-write left it empty
    await fs.writeFile(path.join(f.domMd, torn), '');
    // Not fences, or not files: never touched.
    const old = now - 3 * DAY;
    const others = [
      'fence_notes.txt',
      `fence_${randomUUID().toUpperCase()}_${old}`,
      `fence_${randomUUID()}_${old}.tx-abc123`, // a rewrite's temp file (FenceOperation's to remove)
      `fence_${randomUUID()}_${old}x`,
      `fence_${randomUUID()}_1234567890123456`, // 16 digits
      `fence_${randomUUID()}_`,
      `fence_${randomUUID()}`,
      `xfence_${randomUUID()}_${old}`,
    ];
    for (const n of others) await fs.writeFile(path.join(f.domMd, n), 'not a fence');
    const dirFence = fenceFileName(randomUUID(), old);
    await fs.mkdir(path.join(f.domMd, dirFence));
    const outside = path.join(base, 'outside-target');
    await fs.writeFile(outside, 'must stay');
    const linkFence = fenceFileName(randomUUID(), old);
    await fs.symlink(outside, path.join(f.domMd, linkFence));
    const live = (await f.fenceNames()).find((n) => parseFenceName(n)?.operationId === liveOp)!;
    expect(live).toBeDefined();

    // findGarbage (and the dry run) list the expired regular-file fences only.
    const garbage = await findGarbage(f.root);
    expect(garbage.map((g) => [g.kind, g.relativePath, g.operationId]).sort()).toEqual(
      [
        ['expired-fence', `dom_md/${expired}`, expiredOp],
        ['expired-fence', `dom_md/${torn}`, tornOp],
      ].sort(),
    );
    const listed = await f.gc().list(f.root);
    expect(listed.map((i) => [i.kind, i.skipReason]).sort()).toEqual([
      ['expired-fence', ''],
      ['expired-fence', ''],
    ]);
    expect(listed.every((i) => i.ageMs > DAY)).toBe(true);

    // Both expired fences are still there when the pass gets the domain lease: removed under it.
    const seenUnderLease: string[][] = [];
    f.leases.onDomainLease = async () => void seenUnderLease.push(await f.fenceNames());
    const pass = await f.gc().collect(f.root);
    expect(seenUnderLease[0]).toEqual(expect.arrayContaining([expired, torn]));
    expect(pass).toMatchObject({ collected: true, itemsFound: 2, itemsRemoved: 2, itemsSkipped: 0, backlog: 0 });
    expect(pass.domainLeaseBatches).toBe(1);
    // The fence-named symlink and directory are reported (hostile), not followed or removed.
    expect(pass.errors).toHaveLength(2);
    expect(pass.errors.join('\n')).toContain(linkFence);
    expect(pass.errors.join('\n')).toContain(dirFence);
    expect(await f.fenceNames()).toEqual([live, ...others.filter((n) => n.startsWith('fence')), dirFence, linkFence].sort());
    expect(await fs.readFile(outside, 'utf8')).toBe('must stay');
    expect(await fs.readdir(path.join(f.domMd, dirFence))).toEqual([]);
    expect(await fs.readdir(f.domMd)).toContain(others.at(-1));
    expect(await f.registry.getSingleMetricAsString('sdmesh_gc_items_removed_total')).toMatch(/kind="expired-fence"} 2/);

    // The live fence still fences: a late create of its operation commits nothing.
    await expect(
      f.engine.createVolume(
        pb.CreateVolumeRequest.fromPartial({ domainPath: f.root, imageId: randomUUID(), volumeId: randomUUID(), capacityBytes: 1 << 20, operationId: liveOp }),
      ),
    ).rejects.toMatchObject({ reason: Reason.OPERATION_FENCED });
    // A second pass finds nothing more.
    expect(await f.gc().collect(f.root)).toMatchObject({ itemsFound: 0, itemsRemoved: 0 });
  });

  it("uses the pass's clock and the configured retention: a fence is removed once it is older than that", async () => {
    const f = await fixture('retention');
    const op = randomUUID();
    const fencedMs = Date.now();
    const name = await f.writeFence(op, fencedMs);
    expect(await f.gc({ now: () => fencedMs + DAY }).collect(f.root)).toMatchObject({ itemsFound: 0 });
    expect(await f.gc({ now: () => fencedMs + 10_000, fenceRetentionMs: 60_000 }).collect(f.root)).toMatchObject({ itemsFound: 0 });
    expect(await f.fenceNames()).toEqual([name]);
    // A grace longer than the fence's age beyond its expiry leaves it for a later pass.
    expect(await f.gc({ now: () => fencedMs + 120_000, fenceRetentionMs: 60_000, graceMs: DAY }).collect(f.root)).toMatchObject({
      itemsFound: 1,
      itemsSkipped: 1,
    });
    expect(await f.gc({ now: () => fencedMs + DAY + 1 }).collect(f.root)).toMatchObject({ itemsFound: 1, itemsRemoved: 1 });
    expect(await f.fenceNames()).toEqual([]);
  });

  it('FenceOperation still removes the expired fences it sees (the bound holds without the GC), by the same rule', async () => {
    const f = await fixture('fence-operation');
    const expired = await f.writeFence(randomUUID(), Date.now() - DAY - 60_000);
    const live = await f.writeFence(randomUUID(), Date.now() - DAY + 60_000);
    const op = randomUUID();
    await f.engine.fenceOperation({ domainPath: f.root, operationId: op });
    const names = await f.fenceNames();
    expect(names).not.toContain(expired);
    expect(names).toContain(live);
    expect(names.filter((n) => parseFenceName(n)?.operationId === op)).toHaveLength(1);
  });
});
