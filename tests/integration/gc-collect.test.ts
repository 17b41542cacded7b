import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { DomainLayout, encodeVolumeRecord, findGarbage, GrpcStatus, newTxId, newVolumeRecord, pb, scanLeaseSlots, SdmeshError } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { committedVolumes, GcMesh, type MetadataTxClient, type RunningGc } from '../harness/gc-mesh';

/**
 * The gc against real parts: 3 hosts (real sanlock daemons, io_timeout 1 s, lease-managers,
 * metadata-tx processes), gc processes from services/gc/dist, real files. Garbage comes from
 * metadata-tx processes SIGKILLed at their fault points.
 */
const MiB = 1024 * 1024;
const T = { timeoutMs: 60000 };

const errorOf = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: unknown) => SdmeshError.from(e),
  );

function createReq(domainPath: string, imageId: string, volumeId: string, parentId = ''): Partial<pb.CreateVolumeRequest> {
  return {
    domainPath,
    imageId,
    volumeId,
    parentId,
    capacityBytes: MiB,
    format: parentId ? pb.VolumeFormat.VOLUME_FORMAT_QCOW2 : pb.VolumeFormat.VOLUME_FORMAT_RAW,
  };
}

describe('gc with 3 sanlock hosts', () => {
  const gm = new GcMesh(3);
  const gcs: RunningGc[] = [];
  const startGc = async (i: number, env: NodeJS.ProcessEnv) => {
    const g = await gm.startGc(i, env);
    gcs.push(g);
    return g;
  };
  const stopGcs = async () => {
    await Promise.all(gcs.splice(0).map((g) => g.service.process.stop('SIGTERM', 10000)));
  };

  beforeAll(async () => {
    await gm.start();
  });
  afterAll(async () => {
    await stopGcs();
    await gm.stop();
  });
  afterEach(stopGcs);

  it('removes the garbage of every metadata-tx fault point; the domain keeps exactly the committed volumes and freed slots are reused', async () => {
    const dom = await gm.formatDomain('faults');
    const mt = gm.mt[0]!;
    const expected = new Set<string>();
    const make = async (client: MetadataTxClient, imageId: string, volumeId: string, parentId = '') => {
      await client.createVolume(createReq(dom.path, imageId, volumeId, parentId), T);
      expected.add(volumeId);
    };
    const [keepImg, snapImg, delVolImg, delImg] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    const keepVol = randomUUID();
    const snapBase = randomUUID();
    const [dvBase, dvLeaf] = [randomUUID(), randomUUID()];
    await make(mt, keepImg, keepVol);
    await make(mt, snapImg, snapBase);
    await make(mt, delVolImg, dvBase);
    await make(mt, delVolImg, dvLeaf, dvBase);
    const delImgVol = randomUUID();
    await make(mt, delImg, delImgVol);

    type Case = { point: string; run: (c: MetadataTxClient) => Promise<unknown>; commits?: string; deletes?: string[] };
    const cases: Case[] = [
      ...['create.after-marker', 'create.after-meta', 'create.after-lease', 'create.after-data', 'create.before-commit', 'create.after-commit'].map((point) => {
        const vol = randomUUID();
        return {
          point,
          run: (c: MetadataTxClient) => c.createVolume(createReq(dom.path, randomUUID(), vol), T),
          commits: point === 'create.after-commit' ? vol : undefined,
        };
      }),
      ...['create.after-lease', 'create.after-data'].map((point) => ({
        point,
        run: (c: MetadataTxClient) => c.createVolume(createReq(dom.path, snapImg, randomUUID(), snapBase), T),
      })),
      { point: 'delete.after-rename', run: (c) => c.deleteVolume({ domainPath: dom.path, imageId: delVolImg, volumeId: dvLeaf }, T), deletes: [dvLeaf] },
      { point: 'delete.after-rename', run: (c) => c.deleteImage({ domainPath: dom.path, imageId: delImg }, T), deletes: [delImgVol] },
    ];
    for (const c of cases) {
      const faulty = await gm.startFaultyMetadataTx(0, c.point);
      const err = await errorOf(c.run(faulty.client));
      expect(err?.code).toBe(GrpcStatus.UNAVAILABLE); // the process died under the call
      expect(await faulty.service.process.exited).toBe('SIGKILL');
      if (c.commits) expected.add(c.commits);
      for (const d of c.deletes ?? []) expected.delete(d);
    }
    const garbage = await findGarbage(dom.path);
    expect(new Set(garbage.map((g) => g.kind))).toEqual(
      new Set(['uncommitted-image', 'uncommitted-volume-meta', 'orphan-volume-data', 'deleted-volume-meta', 'deleted-image']),
    );
    expect([...(await committedVolumes(dom.path)).keys()].sort()).toEqual([...expected].sort());

    const gc = await startGc(1, { SDMESH_DOMAINS: dom.path });
    const dry = await gc.client.listGarbage({ domainPath: dom.path }, T);
    expect(dry.items.map((i) => i.relativePath).sort()).toEqual(garbage.map((g) => g.relativePath).sort());
    expect(dry.items.filter((i) => i.skipReason)).toEqual([]);
    expect(await findGarbage(dom.path)).toHaveLength(garbage.length); // the dry run removed nothing

    const { passes } = await gc.client.collectGarbage({ domainPath: dom.path }, T);
    expect(passes).toHaveLength(1);
    expect(passes[0]).toMatchObject({
      collected: true,
      domainId: dom.id,
      host: gc.host,
      itemsFound: garbage.length,
      itemsRemoved: garbage.length,
      itemsSkipped: 0,
      errors: [],
      backlog: 0,
    });
    expect(await findGarbage(dom.path)).toEqual([]);
    const committed = await committedVolumes(dom.path);
    expect([...committed.keys()].sort()).toEqual([...expected].sort());
    expect([...(await scanLeaseSlots(dom.path)).usedSlots].sort((a, b) => a - b)).toEqual([...committed.values()].sort((a, b) => a - b));

    // Freed slots are reused: new creates (on another host) get the lowest free slots.
    const used = new Set(committed.values());
    const free = Array.from({ length: 40 }, (_, i) => i + 3)
      .filter((s) => !used.has(s))
      .slice(0, 3);
    const got: number[] = [];
    for (let i = 0; i < 3; i++) {
      const v = await gm.mt[2]!.createVolume(createReq(dom.path, randomUUID(), randomUUID()), T);
      got.push(v.lease!.offset / MiB);
    }
    expect(got).toEqual(free);
    expect(Math.min(...free)).toBeLessThan(Math.max(...committed.values())); // a freed slot, not a fresh one

    const status = await gc.client.getGcStatus({}, T);
    expect(status.lastPasses).toEqual([expect.objectContaining({ domainId: dom.id, itemsRemoved: garbage.length, collected: true })]);
    const removedEvents = gm.gcEvents(dom.id).filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED);
    await waitFor(
      'one event per item',
      () => (gm.gcEvents(dom.id).filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED).length === garbage.length ? true : undefined),
      5000,
    );
    expect(removedEvents.every((e) => e.host === gc.host)).toBe(true);
    const metrics = await (await fetch(`http://127.0.0.1:${gc.service.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/sdmesh_gc_passes_total\{result="collected"[^}]*\} 1/);
    expect(metrics).toMatch(new RegExp(`sdmesh_gc_backlog_items\\{domain="${dom.id}"[^}]*\\} 0`));
  });

  it('creates running continuously while 3 GCs collect every second lose nothing, and passes never overlap', async () => {
    const dom = await gm.formatDomain('busy');
    for (let i = 0; i < 3; i++) await startGc(i, { SDMESH_DOMAINS: dom.path, SDMESH_INTERVAL_MS: '1000', SDMESH_BATCH_MAX_ITEMS: '2' });
    const expected = new Set<string>();
    let deletedImages = 0;
    const until = Date.now() + 12000;
    await Promise.all(
      gm.mt.map(async (client, w) => {
        for (let i = 0; Date.now() < until; i++) {
          const [img, base, snap] = [randomUUID(), randomUUID(), randomUUID()];
          await client.createVolume(createReq(dom.path, img, base), T);
          expected.add(base);
          if (i % 2 === 0) {
            await client.createVolume(createReq(dom.path, img, snap, base), T);
            expected.add(snap);
          }
          if ((i + w) % 3 === 0) {
            await client.deleteImage({ domainPath: dom.path, imageId: img }, T);
            expected.delete(base);
            expected.delete(snap);
            deletedImages++;
          }
        }
      }),
    );
    expect(deletedImages).toBeGreaterThan(3);
    console.log(`busy domain: ${expected.size} committed volumes, ${deletedImages} images deleted`);
    await waitFor('garbage collected', async () => ((await findGarbage(dom.path)).length === 0 ? true : undefined), 60_000, 250);
    expect([...(await committedVolumes(dom.path)).keys()].sort()).toEqual([...expected].sort());

    // Only one host collects at a time: the collected passes of all hosts never overlap.
    const passes = (await Promise.all(gcs.map((g) => g.client.getGcStatus({}, T)))).flatMap((s) => s.lastPasses);
    const removed = gm.gcEvents(dom.id).filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED);
    expect(removed.length).toBeGreaterThanOrEqual(deletedImages);
    expect(passes.every((p) => p.errors.length === 0)).toBe(true);
    // Passes are periodic; on a loaded machine fewer fit in the window, so wait for a few.
    await waitFor(
      'several finished passes',
      () => (gm.gcEvents(dom.id).filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_PASS_FINISHED).length > 3 ? true : undefined),
      30000,
      250,
    );
    const intervals = gcs.flatMap((g) => collectedIntervals(g.service.lines.join('\n')));
    intervals.sort((a, b) => a.start - b.start);
    for (let i = 1; i < intervals.length; i++) expect(intervals[i]!.start).toBeGreaterThanOrEqual(intervals[i - 1]!.end);
    expect(intervals.length).toBeGreaterThan(1);
  });

  it('GC on 3 hosts: one collects; killed mid-pass, another host finishes the job', async () => {
    const group = 'takeover';
    const dom = await gm.formatDomain(group);
    const keep = randomUUID();
    await gm.mt[0]!.createVolume(createReq(dom.path, randomUUID(), keep), T);
    // 90 leftovers of killed new-image creates (records claiming slots 100..189, some data).
    leaveUncommittedImages(dom, 90, 100);
    // Small batches with pauses make the pass last several seconds, long enough to kill it.
    const env = {
      SDMESH_STORAGE_ROOTS: path.join(gm.mesh.storageDir, group),
      SDMESH_INTERVAL_MS: '1000',
      SDMESH_BATCH_MAX_ITEMS: '3',
      SDMESH_SOLO_BATCH_MAX_ITEMS: '3',
      SDMESH_BATCH_PAUSE_MS: '150',
    };
    await Promise.all([0, 1, 2].map((i) => startGc(i, env)));
    const first = await waitFor('a first removal', () => gm.gcEvents(dom.id).find((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED), 30000, 20);
    const collector = gcs.find((g) => g.host === first.host)!;
    const others = gcs.filter((g) => g !== collector);
    // While it collects, the others' passes are skipped: the GC lease is held.
    const skipped = await waitFor(
      'another host skipping the domain',
      async () => {
        for (const g of others) {
          const p = (await g.client.getGcStatus({}, T)).lastPasses.find((x) => x.domainId === dom.id);
          if (p && !p.collected) return p;
        }
        return undefined;
      },
      30_000,
      100,
    );
    expect(skipped.notCollectedReason).toMatch(/held/);
    await collector.service.process.stop('SIGKILL');
    const byCollector = gm.gcEvents(dom.id).filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED && e.host === collector.host).length;
    expect(byCollector).toBeLessThan(90); // killed mid-pass

    await waitFor('garbage collected by another host', async () => ((await findGarbage(dom.path)).length === 0 ? true : undefined), 60_000, 250);
    // Storage is clean before the last reports reach this test (another path: NATS). A host's
    // events arrive in order, so once each successor's pass that ended after its last removal
    // has been seen finished, all of its removals have been seen.
    const removed = await waitFor(
      "every successor's reports",
      () => {
        const events = gm.gcEvents(dom.id);
        const hosts = new Set(events.filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED && e.host !== collector.host).map((e) => e.host));
        const reported = [...hosts].every((h) => {
          const last = events.map((e) => e.host === h && e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED).lastIndexOf(true);
          return events.some((e, i) => i > last && e.host === h && e.gc.kind === pb.GcEvent_Kind.KIND_PASS_FINISHED);
        });
        return hosts.size > 0 && reported ? events.filter((e) => e.gc.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED) : undefined;
      },
      60_000,
      250,
    );
    // Every item was reported removed at most once; only those of the batch in flight at the kill
    // maybe by nobody: a batch's items (3 here) are removed at once, each reported after its removal.
    const paths = removed.map((e) => e.gc.relativePath);
    expect(new Set(paths).size).toBe(paths.length);
    expect(paths.length).toBeGreaterThanOrEqual(90 - Number(env.SDMESH_BATCH_MAX_ITEMS));
    expect([...(await committedVolumes(dom.path)).keys()]).toEqual([keep]);
  });

  it('domain-lease batches are longer while no one else takes the lease between them (lver), short again while creates of this and another host take it', async () => {
    const dom = await gm.formatDomain('solo', 600);
    const gc = await startGc(0, {
      SDMESH_DOMAINS: dom.path,
      SDMESH_BATCH_MAX_ITEMS: '2',
      SDMESH_SOLO_BATCH_MAX_ITEMS: '16',
      SDMESH_BATCH_PAUSE_MS: '100',
      SDMESH_PARALLEL_ITEMS: '8',
      // Every lease in the gc process: groups of volume leases, the domain lease and the GC lease at once (sanlock's EBUSY retried).
      SDMESH_LEASE_WORKERS: '0',
    });
    // Deleted images with real lease areas (their records go under their volume leases, several per acquire) and
    // leftovers of killed creates (no volume lease), 60 items in all.
    const deleted: string[] = [];
    for (let i = 0; i < 12; i++) {
      const img = randomUUID();
      await gm.mt[1]!.createVolume(createReq(dom.path, img, randomUUID()), T);
      await gm.mt[1]!.deleteImage({ domainPath: dom.path, imageId: img }, T);
      deleted.push(img);
    }
    leaveUncommittedImages(dom, 48, 150);
    const batchesOf = (from: number) => gcBatches(gc.service.lines.slice(from).join('\n'));

    // Alone: the first batch proves nothing (short), then each shows lver = previous + 1: longer ones.
    let from = gc.service.lines.length;
    let { passes } = await gc.client.collectGarbage({ domainPath: dom.path }, T);
    expect(passes[0]).toMatchObject({ collected: true, itemsFound: 60, itemsRemoved: 60, errors: [] });
    let batches = batchesOf(from);
    expect(batches[0]).toMatchObject({ solo: false, items: 2 });
    expect(batches.length).toBeGreaterThan(2);
    for (let i = 1; i < batches.length; i++) expect(batches[i]).toMatchObject({ solo: true, lver: batches[i - 1]!.lver + 1 });
    expect(Math.max(...batches.map((b) => b.items))).toBeGreaterThan(2);
    expect(batches.length).toBeLessThan(30); // 60 items, 2 per short batch
    expect(await findGarbage(dom.path)).toEqual([]);

    // Creates of this host and of another one in the pauses: the batch after each is short again, and they get in.
    // Both hosts create (lockspace joined) before the pass starts and go on, paced, until it ends: unpaced, a
    // fast host's creates could all be over before the pass's first batch. At most 250 each (the domain has 600 slots).
    leaveUncommittedImages(dom, 120, 200);
    let creating = true;
    const created: string[] = [];
    const firstCreates: Promise<void>[] = [];
    const creates = [0, 1].map((h) => {
      let firstDone!: () => void;
      firstCreates.push(new Promise<void>((resolve) => (firstDone = resolve)));
      return (async () => {
        for (let i = 0; creating && i < 250; i++) {
          const vol = randomUUID();
          await gm.mt[h]!.createVolume(createReq(dom.path, randomUUID(), vol), T);
          created.push(vol);
          firstDone();
          await new Promise((r) => setTimeout(r, 25));
        }
      })();
    });
    await Promise.race([Promise.all(firstCreates), Promise.all(creates)]);
    from = gc.service.lines.length;
    try {
      ({ passes } = await gc.client.collectGarbage({ domainPath: dom.path }, T));
    } finally {
      creating = false;
      await Promise.all(creates);
    }
    expect(passes[0]).toMatchObject({ collected: true, itemsFound: 120, itemsRemoved: 120, errors: [] });
    batches = batchesOf(from);
    const afterOthers = batches.slice(1).filter((b, i) => b.lver > batches[i]!.lver + 1);
    expect(afterOthers.length).toBeGreaterThan(0);
    for (const b of afterOthers) expect(b).toMatchObject({ solo: false, items: 2 });
    expect(created.length).toBeGreaterThan(0);
    const committed = await committedVolumes(dom.path);
    for (const v of created) expect(committed.has(v)).toBe(true);
    expect(await findGarbage(dom.path)).toEqual([]);
  });

  it('kill -9 in the middle of removing an item (fault point), rerun: the item is gone and nothing else', async () => {
    const dom = await gm.formatDomain('killed');
    const mt = gm.mt[2]!;
    const [keepImg, keepVol, dropImg, d1, d2] = [randomUUID(), randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await mt.createVolume(createReq(dom.path, keepImg, keepVol), T);
    await mt.createVolume(createReq(dom.path, dropImg, d1), T);
    await mt.createVolume(createReq(dom.path, dropImg, d2, d1), T);
    await mt.deleteImage({ domainPath: dom.path, imageId: dropImg }, T);
    const [item] = await findGarbage(dom.path);
    expect(item!.kind).toBe('deleted-image');

    const killed = await gm.startGc(2, { SDMESH_DOMAINS: dom.path, SDMESH_FAULT_POINT: 'gc.item.after-data' });
    const err = await errorOf(killed.client.collectGarbage({ domainPath: dom.path }, T));
    expect(err?.code).toBe(GrpcStatus.UNAVAILABLE);
    expect(await killed.service.process.exited).toBe('SIGKILL');
    // Half removed: the data is gone, the records (slot claims) are still there, still garbage.
    const dir = path.join(dom.path, item!.relativePath);
    expect(fs.readdirSync(dir).sort()).toEqual([`${d1}.meta`, `${d2}.meta`].sort());
    expect((await findGarbage(dom.path)).map((g) => g.relativePath)).toEqual([item!.relativePath]);

    const rerun = await startGc(2, { SDMESH_DOMAINS: dom.path });
    const { passes } = await rerun.client.collectGarbage({ domainPath: dom.path }, T);
    expect(passes[0]).toMatchObject({ collected: true, itemsFound: 1, itemsRemoved: 1, errors: [] }); // the dead GC's lease was freed
    expect(fs.existsSync(dir)).toBe(false);
    expect(await findGarbage(dom.path)).toEqual([]);
    expect([...(await committedVolumes(dom.path)).keys()]).toEqual([keepVol]);
    expect(fs.readdirSync(new DomainLayout(dom.path).imagesDir)).toEqual([keepImg]);
    const slots = (await scanLeaseSlots(dom.path)).usedSlots;
    expect([...slots]).toEqual([3]);
  });
});

/** The domain-lease batches a gc log reports, in order. */
function gcBatches(log: string): { lver: number; solo: boolean; items: number }[] {
  return log
    .split('\n')
    .filter((l) => l.includes('"gc domain-lease batch"'))
    .map((l) => JSON.parse(l) as { lver: number; solo: boolean; items: number })
    .map(({ lver, solo, items }) => ({ lver, solo, items }));
}

/** n leftovers of killed new-image creates (records claiming slots from firstSlot, some data). */
function leaveUncommittedImages(dom: { id: string; path: string }, n: number, firstSlot: number): void {
  const layout = new DomainLayout(dom.path);
  const old = Date.now() - 3600_000;
  for (let i = 0; i < n; i++) {
    const [img, vol] = [randomUUID(), randomUUID()];
    const dir = layout.txImageDir(newTxId(3, 999, old), img);
    fs.mkdirSync(dir);
    const record = newVolumeRecord({ volumeId: vol, imageId: img, domainId: dom.id, capacityBytes: MiB, ctimeMs: old, leaseSlot: firstSlot + i });
    fs.writeFileSync(path.join(dir, `${vol}.meta`), encodeVolumeRecord(record));
    fs.writeFileSync(path.join(dir, vol), Buffer.alloc(64 * 1024, 7));
  }
}

/** When each pass a gc log says it collected worked under the GC lease. */
function collectedIntervals(log: string): { start: number; end: number }[] {
  return log
    .split('\n')
    .filter((l) => l.includes('"gc pass finished"'))
    .map((l) => JSON.parse(l) as { gcLeaseWorkFromMs: number; gcLeaseWorkToMs: number })
    .map((r) => ({ start: r.gcLeaseWorkFromMs, end: r.gcLeaseWorkToMs }));
}
