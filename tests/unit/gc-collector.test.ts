import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import {
  ConfinedRoot,
  DomainLayout,
  encodeVolumeRecord,
  newVolumeRecord,
  findGarbage,
  newTxId,
  pb,
  scanLeaseSlots,
  listCommittedImageIds,
  listVolumeRecords,
  type VolumeRecord,
} from '@sdmesh/common';
import { GarbageCollector, type BatchRecord, type GarbageCollectorOptions } from '../../services/gc/src/collector';
import { GcFaultInjector, type GcFaultPoint } from '../../services/gc/src/faults';
import { GcMetrics } from '../../services/gc/src/metrics';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { FakeGcLeases } from '../harness/gc-fakes';

const MiB = 1024 * 1024;
const HOUR = 3600_000;

class SimulatedKill extends Error {}

interface Fixture {
  root: string;
  domainId: string;
  leases: FakeGcLeases;
  engine: MetadataTransactions;
  events: pb.Event['payload'][];
  registry: Registry;
  gc(opts?: Partial<GarbageCollectorOptions>): GarbageCollector;
}

let base: string;
beforeAll(async () => {
  base = await fs.mkdtemp('/var/tmp/sdmesh-gc-unit-');
});
afterAll(async () => {
  await fs.rm(base, { recursive: true, force: true });
});

async function fixture(name: string): Promise<Fixture> {
  const root = path.join(base, name);
  const domainId = randomUUID();
  const leases = new FakeGcLeases();
  const engine = new MetadataTransactions({ leases: leases.domainLeases, registry: new Registry(), hostId: 1 });
  await engine.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId, name, path: root, maxVolumes: 50 }));
  const events: pb.Event['payload'][] = [];
  const registry = new Registry();
  const metrics = new GcMetrics(registry);
  return {
    root,
    domainId,
    leases,
    engine,
    events,
    registry,
    gc: (opts = {}) =>
      new GarbageCollector({
        leases,
        hostName: 'host-a',
        graceMs: 0,
        batchPauseMs: 0,
        events: { publish: (p) => (events.push(p), pb.Event.fromPartial({})) },
        metrics,
        ...opts,
      }),
  };
}

const create = (f: Fixture, imageId: string, volumeId: string, parentId = '') =>
  f.engine.createVolume(
    pb.CreateVolumeRequest.fromPartial({
      domainPath: f.root,
      imageId,
      volumeId,
      parentId,
      capacityBytes: MiB,
      format: parentId ? pb.VolumeFormat.VOLUME_FORMAT_QCOW2 : pb.VolumeFormat.VOLUME_FORMAT_RAW,
    }),
  );

/** Every committed volume id → its lease slot. */
async function committed(root: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const imageId of await listCommittedImageIds(root)) {
    const listing = await listVolumeRecords(new DomainLayout(root).imageDir(imageId), { imageId });
    for (const r of listing.records) out.set(r.volumeId, r.leaseSlot);
  }
  return out;
}

function record(f: Fixture, imageId: string, volumeId: string, leaseSlot: number): VolumeRecord {
  return newVolumeRecord({ volumeId, imageId, domainId: f.domainId, capacityBytes: MiB, ctimeMs: Date.now() - HOUR, leaseSlot });
}

/** The states a SIGKILLed create leaves (as docs/storage-format.md describes them), made by hand. */
async function leaveTxLeftovers(f: Fixture, committedImage: string): Promise<{ txImage: string; snapshotVolume: string }> {
  const layout = new DomainLayout(f.root);
  const old = Date.now() - HOUR;
  // A new-image create killed after its data was made (slot 20).
  const txImage = randomUUID();
  const txVolume = randomUUID();
  const txDir = layout.txImageDir(newTxId(2, 4242, old), txImage);
  await fs.mkdir(txDir);
  await fs.writeFile(path.join(txDir, `${txVolume}.meta`), encodeVolumeRecord(record(f, txImage, txVolume, 20)));
  await fs.writeFile(path.join(txDir, txVolume), Buffer.alloc(8192, 1));
  // A snapshot create killed after its data (marker record naming slot 21, data without .meta).
  const snapshotVolume = randomUUID();
  const imageDir = layout.imageDir(committedImage);
  await fs.writeFile(
    path.join(imageDir, `${snapshotVolume}.meta.tx-${newTxId(2, 4243, old)}`),
    encodeVolumeRecord(record(f, committedImage, snapshotVolume, 21)),
  );
  await fs.writeFile(path.join(imageDir, snapshotVolume), Buffer.alloc(4096, 2));
  // An interrupted format's temp metadata.
  await fs.writeFile(path.join(layout.domMdDir, `metadata.tx-${newTxId(2, 4244, old)}`), 'RECORD=sdmesh-domain\n');
  return { txImage, snapshotVolume };
}

/** n leftovers of killed new-image creates (a `_tx_` image with its record, slots 3..): each an item removed under the domain lease. */
async function leaveUncommittedImages(f: Fixture, n: number): Promise<void> {
  const layout = new DomainLayout(f.root);
  const old = Date.now() - HOUR;
  for (let i = 0; i < n; i++) {
    const [img, vol] = [randomUUID(), randomUUID()];
    const dir = layout.txImageDir(newTxId(2, 5000 + i, old), img);
    await fs.mkdir(dir);
    await fs.writeFile(path.join(dir, `${vol}.meta`), encodeVolumeRecord(record(f, img, vol, 3 + i)));
  }
}

describe('GarbageCollector', () => {
  it('removes every kind of garbage, keeps every committed volume, and freed slots are reused lowest first', async () => {
    const f = await fixture('all-kinds');
    const [imgA, imgB, imgC] = [randomUUID(), randomUUID(), randomUUID()];
    const [a1, a2, b1, c1, c2] = [randomUUID(), randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await create(f, imgA, a1);
    await create(f, imgA, a2, a1); // snapshot, slot 4
    await create(f, imgB, b1);
    await create(f, imgC, c1);
    await create(f, imgC, c2, c1);
    await f.engine.deleteVolume(pb.DeleteVolumeRequest.fromPartial({ domainPath: f.root, imageId: imgA, volumeId: a2 })); // deleted-volume-meta + data
    await f.engine.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath: f.root, imageId: imgC })); // deleted-image with 2 records
    await leaveTxLeftovers(f, imgB);
    const before = await committed(f.root);
    expect([...before.keys()].sort()).toEqual([a1, b1].sort());

    const kinds = (await findGarbage(f.root)).map((g) => g.kind).sort();
    expect(kinds).toEqual([
      'deleted-image',
      'deleted-volume-data',
      'deleted-volume-meta',
      'orphan-volume-data',
      'uncommitted-domain-metadata',
      'uncommitted-image',
      'uncommitted-volume-meta',
    ]);
    const listed = await f.gc().list(f.root);
    expect(listed).toHaveLength(7);
    expect(listed.every((i) => i.skipReason === '')).toBe(true);
    expect(listed.find((i) => i.kind === 'uncommitted-image')!.txHostId).toBe(2);
    expect(listed.find((i) => i.kind === 'uncommitted-image')!.bytes).toBeGreaterThan(0);

    const pass = await f.gc().collect(f.root);
    expect(pass).toMatchObject({
      collected: true,
      itemsFound: 7,
      itemsRemoved: 7,
      itemsSkipped: 0,
      errors: [],
      backlog: 0,
      domainId: f.domainId,
      host: 'host-a',
    });
    expect(pass.bytesFreed).toBeGreaterThan(8192);
    expect(await findGarbage(f.root)).toEqual([]);
    expect(await committed(f.root)).toEqual(before);
    // Only committed records claim slots now; the next creates get the lowest freed ones.
    expect([...(await scanLeaseSlots(f.root)).usedSlots].sort()).toEqual([...before.values()].sort());
    const again = await create(f, randomUUID(), randomUUID());
    const usedBefore = new Set(before.values());
    const lowestFree = [3, 4, 5, 6, 7].find((s) => !usedBefore.has(s));
    expect(again.lease?.offset).toBe(lowestFree! * MiB);

    // One event per item, one per pass; deleted records were removed under their volume lease.
    const gcEvents = f.events.flatMap((e) => (e?.$case === 'gc' ? [e.gc] : []));
    expect(gcEvents.filter((e) => e.kind === pb.GcEvent_Kind.KIND_ITEM_REMOVED)).toHaveLength(7);
    expect(gcEvents.filter((e) => e.kind === pb.GcEvent_Kind.KIND_PASS_FINISHED)).toHaveLength(1);
    expect(f.leases.log.filter((l) => l.startsWith('vol+'))).toHaveLength(3); // a2, c1, c2
    expect(f.leases.log[0]).toBe('gc+');
    expect(f.leases.log.at(-1)).toBe('gc-');
    const metrics = await f.registry.getSingleMetricAsString('sdmesh_gc_items_removed_total');
    expect(metrics).toMatch(/kind="uncommitted-image"} 1/);
    expect(await f.registry.getSingleMetricAsString('sdmesh_gc_passes_total')).toMatch(/result="collected"} 1/);

    // A second pass finds nothing.
    expect(await f.gc().collect(f.root)).toMatchObject({ collected: true, itemsFound: 0, itemsRemoved: 0 });
  });

  it('leaves items younger than the grace period and says so in the dry run', async () => {
    const f = await fixture('grace');
    const img = randomUUID();
    await create(f, img, randomUUID());
    await f.engine.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath: f.root, imageId: img }));
    const gc = f.gc({ graceMs: HOUR });
    const [item] = await gc.list(f.root);
    expect(item!.skipReason).toMatch(/younger than the grace period/);
    expect(await gc.collect(f.root)).toMatchObject({ itemsFound: 1, itemsRemoved: 0, itemsSkipped: 1, backlog: 1 });
    expect(await findGarbage(f.root)).toHaveLength(1);
    expect(await f.gc({ graceMs: 0, now: () => Date.now() + 2 * HOUR }).collect(f.root)).toMatchObject({ itemsRemoved: 1 });
  });

  it('does not collect when another host holds the GC lease', async () => {
    const f = await fixture('gc-lease');
    const img = randomUUID();
    await create(f, img, randomUUID());
    await f.engine.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath: f.root, imageId: img }));
    f.leases.gcHeldElsewhere.add(f.domainId);
    const pass = await f.gc().collect(f.root);
    expect(pass).toMatchObject({ collected: false, itemsFound: 0, itemsRemoved: 0 });
    expect(pass.notCollectedReason).toMatch(/another host collects this domain.*host id 9/);
    expect(await findGarbage(f.root)).toHaveLength(1);
    expect(f.events.filter((e) => e?.$case === 'gc')).toEqual([]);
  });

  it('removes the data of a deleted volume whose lease is held, and its record only once the lease is free', async () => {
    const f = await fixture('volume-lease');
    const [img, v1, v2] = [randomUUID(), randomUUID(), randomUUID()];
    await create(f, img, v1);
    await create(f, img, v2, v1);
    await f.engine.deleteVolume(pb.DeleteVolumeRequest.fromPartial({ domainPath: f.root, imageId: img, volumeId: v2 }));
    f.leases.volumesHeldElsewhere.add(v2);
    const listed = await f.gc().list(f.root);
    expect(listed.find((i) => i.kind === 'deleted-volume-meta')!.skipReason).toMatch(/lease of volume .* is held by host 9/);
    const first = await f.gc().collect(f.root);
    expect(first).toMatchObject({ itemsFound: 2, itemsRemoved: 1, itemsSkipped: 1, errors: [] });
    expect((await findGarbage(f.root)).map((g) => g.kind)).toEqual(['deleted-volume-meta']);
    f.leases.volumesHeldElsewhere.clear();
    expect(await f.gc().collect(f.root)).toMatchObject({ itemsFound: 1, itemsRemoved: 1 });
    expect([...(await committed(f.root)).keys()]).toEqual([v1]);
  });

  it('re-checks under the domain lease: a snapshot that committed after the listing is not touched', async () => {
    const f = await fixture('recheck');
    const img = randomUUID();
    const base = randomUUID();
    await create(f, img, base);
    const { snapshotVolume } = await leaveTxLeftovers(f, img);
    const imageDir = new DomainLayout(f.root).imageDir(img);
    // Between the listing and the lease, "the transaction" commits its marker.
    f.leases.onDomainLease = async () => {
      f.leases.onDomainLease = undefined;
      const marker = (await fs.readdir(imageDir)).find((n) => n.startsWith(`${snapshotVolume}.meta.tx-`))!;
      await fs.rename(path.join(imageDir, marker), path.join(imageDir, `${snapshotVolume}.meta`));
    };
    const pass = await f.gc().collect(f.root);
    expect(pass.itemsSkipped).toBe(2); // the orphan data (now committed) and the marker (gone)
    expect(await fs.stat(path.join(imageDir, snapshotVolume))).toBeTruthy();
    expect((await committed(f.root)).has(snapshotVolume)).toBe(true);
  });

  it.each<[GcFaultPoint, string]>([
    ['gc.item.after-data', 'data gone, records left'],
    ['gc.item.after-record', 'records gone, directory left'],
    ['gc.batch.after-domain-lease', 'nothing removed under the lease yet'],
  ])('killed at %s (%s): a rerun removes the item and nothing else', async (point) => {
    const f = await fixture(`fault-${point}`);
    const [keep, drop, k1, d1, d2] = [randomUUID(), randomUUID(), randomUUID(), randomUUID(), randomUUID()];
    await create(f, keep, k1);
    await create(f, drop, d1);
    await create(f, drop, d2, d1);
    await f.engine.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath: f.root, imageId: drop }));
    const before = await committed(f.root);
    const killed = f.gc({
      faults: new GcFaultInjector(point, () => {
        throw new SimulatedKill(point);
      }),
    });
    await killed.collect(f.root).catch(() => undefined);
    const left = await findGarbage(f.root);
    expect(left.map((g) => g.kind)).toEqual(['deleted-image']); // still recognized as garbage
    const rerun = await f.gc().collect(f.root);
    expect(rerun).toMatchObject({ itemsFound: 1, itemsRemoved: 1, errors: [] });
    expect(await findGarbage(f.root)).toEqual([]);
    expect(await committed(f.root)).toEqual(before);
    expect((await fs.readdir(new DomainLayout(f.root).imagesDir)).sort()).toEqual([keep]);
  });

  it('never removes a transaction in flight: creates running during GC passes all survive', async () => {
    const f = await fixture('concurrent');
    const gc = f.gc({ batchMaxItems: 1 });
    const done: string[] = [];
    let stop = false;
    const gcLoop = (async () => {
      let passes = 0;
      while (!stop || passes < 2) {
        const pass = await gc.collect(f.root);
        expect(pass.errors).toEqual([]);
        passes++;
      }
      return passes;
    })();
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        for (let i = 0; i < 6; i++) {
          const [img, vol] = [randomUUID(), randomUUID()];
          await create(f, img, vol);
          if (i % 2 === 0) await create(f, img, randomUUID(), vol).then((v) => done.push(v.id));
          done.push(vol);
        }
      }),
    );
    stop = true;
    expect(await gcLoop).toBeGreaterThanOrEqual(2);
    expect([...(await committed(f.root)).keys()].sort()).toEqual([...done].sort());
    expect(await findGarbage(f.root)).toEqual([]);
  });

  it('sends one BACKLOG_HIGH event when the backlog stays above the threshold', async () => {
    const f = await fixture('backlog');
    for (let i = 0; i < 3; i++) {
      const img = randomUUID();
      await create(f, img, randomUUID());
      await f.engine.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath: f.root, imageId: img }));
    }
    const gc = f.gc({ graceMs: HOUR, backlogThreshold: 2, backlogPasses: 3 });
    for (let i = 0; i < 5; i++) await gc.collect(f.root);
    const high = f.events.flatMap((e) => (e?.$case === 'gc' && e.gc.kind === pb.GcEvent_Kind.KIND_BACKLOG_HIGH ? [e.gc] : []));
    expect(high).toEqual([expect.objectContaining({ domainId: f.domainId, backlog: 3 })]);
    expect(await f.registry.getSingleMetricAsString('sdmesh_gc_backlog_items')).toMatch(new RegExp(`domain="${f.domainId}"} 3`));
  });

  it('batches: deleted volumes of one image removed in parallel, the image listed once per batch and fsynced before the domain lease is released', async () => {
    const f = await fixture('batched');
    const image = randomUUID();
    const volumes = Array.from({ length: 7 }, () => randomUUID());
    for (const [i, v] of volumes.entries()) await create(f, image, v, i ? volumes[i - 1] : '');
    for (const v of volumes.slice(1).reverse())
      await f.engine.deleteVolume(pb.DeleteVolumeRequest.fromPartial({ domainPath: f.root, imageId: image, volumeId: v }));
    const imageDir = new DomainLayout(f.root).imageDir(image);
    const fsync = jest.spyOn(ConfinedRoot.prototype, 'fsyncDir').mockImplementation(async function (this: ConfinedRoot, dir: string) {
      f.leases.log.push(`fsync ${path.relative(f.root, dir)}`);
    });
    const list = jest.spyOn(ConfinedRoot.prototype, 'list');
    let listed: string[] = [];
    try {
      const pass = await f.gc({ parallelItems: 4 }).collect(f.root);
      expect(pass).toMatchObject({ itemsFound: 12, itemsRemoved: 12, errors: [], domainLeaseBatches: 1 });
      listed = list.mock.calls.map(([dir]) => dir);
    } finally {
      fsync.mockRestore();
      list.mockRestore();
    }
    expect((await committed(f.root)).size).toBe(1);
    // Under the lease: the 6 records, each under its volume lease, then the image's fsync, then the release.
    const log = f.leases.log;
    const [held, released] = [log.indexOf('sdm+'), log.lastIndexOf('sdm-')];
    expect(log.slice(held, released).filter((l) => l.startsWith('vol+'))).toHaveLength(6);
    const lastRecord = log.map((l, i) => (l.startsWith('vol-') ? i : -1)).reduce((a, b) => Math.max(a, b));
    const imageSync = log.lastIndexOf(`fsync ${path.relative(f.root, imageDir)}`);
    expect(lastRecord).toBeLessThan(imageSync);
    expect(imageSync).toBeLessThan(released);
    expect(log.filter((l) => l === `fsync ${path.relative(f.root, imageDir)}`).length).toBeLessThanOrEqual(2); // phase 1's end, the batch's end
    // Listed by findGarbage and once by the batch (it was once per deleted volume in it).
    expect(listed.filter((dir) => dir === imageDir)).toHaveLength(2);
  });

  it('longer batches while nobody else takes the domain lease between them (lver = previous + 1); short again after another holder', async () => {
    const f = await fixture('solo');
    await leaveUncommittedImages(f, 26);
    const batches: BatchRecord[] = [];
    const gc = f.gc({
      batchMaxItems: 2,
      soloBatchMaxItems: 8,
      parallelItems: 1,
      onBatch: (b) => {
        batches.push(b);
        // Another holder (a create on some host) takes the lease in the pause after the third batch.
        if (batches.length === 3) f.leases.otherHolder(f.domainId);
      },
    });
    const pass = await gc.collect(f.root);
    expect(pass).toMatchObject({ itemsFound: 26, itemsRemoved: 26, errors: [] });
    expect(await findGarbage(f.root)).toEqual([]);
    // The first batch of a pass proves nothing (short); then solo ones; after the other holder, short once, then solo.
    expect(batches.map((b) => [b.solo, b.items])).toEqual([
      [false, 2],
      [true, 8],
      [true, 8],
      [false, 2],
      [true, 6],
    ]);
    expect(pass.domainLeaseBatches).toBe(5);
    for (let i = 1; i < batches.length; i++) expect(batches[i]!.lver).toBe(batches[i - 1]!.lver + (i === 3 ? 2 : 1));
  });

  it('a solo batch is still bounded in time: it takes no new item after soloBatchMaxMs', async () => {
    const f = await fixture('solo-time');
    await leaveUncommittedImages(f, 6);
    // A clock that advances 40 ms per reading: each item "takes" time without the test waiting.
    let clock = Date.now();
    const batches: BatchRecord[] = [];
    const gc = f.gc({
      batchMaxItems: 1,
      batchMaxMs: 1,
      soloBatchMaxItems: 100,
      soloBatchMaxMs: 100,
      parallelItems: 1,
      now: () => (clock += 40),
      onBatch: (b) => batches.push(b),
    });
    const pass = await gc.collect(f.root);
    expect(pass).toMatchObject({ itemsRemoved: 6, errors: [] });
    expect(batches[0]).toMatchObject({ solo: false, items: 1 });
    // Solo batches end on their time bound long before their item bound of 100.
    expect(batches.slice(1).every((b) => b.solo && b.items >= 1 && b.items < 6)).toBe(true);
    expect(batches.length).toBeGreaterThan(2);
  });

  it('refuses a path that is not a domain with a clear error, changing nothing', async () => {
    const f = await fixture('bad-input');
    await expect(f.gc().list('relative/path')).rejects.toMatchObject({ reason: 'INVALID_PATH' });
    await expect(f.gc().list(path.join(base, 'nope'))).rejects.toMatchObject({ reason: 'DOMAIN_NOT_FOUND' });
    const pass = await f.gc().collect(path.join(base, 'nope'));
    expect(pass.collected).toBe(false);
    expect(pass.errors[0]).toMatch(/is not a storage domain/);
  });
});
