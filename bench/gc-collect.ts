/**
 * GC pass cost on big domains, next to the file-system floor measured in the same run:
 *   1. collecting 10 000 garbage items (uncommitted images, deleted images, deleted volumes'
 *      records and data) vs. a plain recursive delete of the same files;
 *   2. a pass on a domain with 10 000 committed volumes and no garbage vs. a bare readdir walk.
 *
 * The domains are written directly with the storage module (records, sparse data files,
 * marker names exactly as metadata-tx writes them) to keep setup fast; the leases are an
 * in-process stand-in, so the figures are the GC's own cost (listing, checks, unlinks, fsyncs).
 * With real sanlock add, per pass, the lease round trips it counts (measure one with
 * `npm run bench -- lease-acquire`): one per deleted record (volume lease) and one per batch
 * (domain lease).
 *
 *   npm run bench -- gc-collect [items=10000]
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import {
  deletedVolumeDataName,
  deletedVolumeMetaName,
  DomainLayout,
  encodeDomainMetadata,
  encodeVolumeRecord,
  findGarbage,
  newTxId,
  volumeMetaName,
  type DomainRef,
  type VolumeRecord,
} from '@sdmesh/common';
import { GarbageCollector, type GcLeaseProvider } from '@sdmesh/gc/dist/collector';
import { GcMetrics } from '@sdmesh/gc/dist/metrics';

const MiB = 1024 * 1024;

/** In-process leases that count what real sanlock would be asked for. */
class CountingLeases implements GcLeaseProvider {
  domainLeases = 0;
  volumeLeases = 0;
  private domainHeld: Promise<void> = Promise.resolve();
  withGcLease<T>(_d: DomainRef, _op: string, fn: () => Promise<T>): Promise<T> {
    return fn();
  }
  async withDomainLease<T>(_d: DomainRef, _op: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.domainHeld;
    let release = () => undefined as void;
    this.domainHeld = new Promise<void>((r) => (release = r));
    await prev;
    this.domainLeases++;
    try {
      return await fn();
    } finally {
      release();
    }
  }
  withVolumeLease<T>(_d: DomainRef, _v: string, _s: number, _m: 'exclusive', _op: string, fn: () => Promise<T>): Promise<T> {
    this.volumeLeases++;
    return fn();
  }
}

async function formatDomain(root: string, maxVolumes: number): Promise<DomainRef> {
  const layout = new DomainLayout(root);
  await fs.mkdir(layout.domMdDir, { recursive: true });
  await fs.mkdir(layout.imagesDir, { recursive: true });
  const id = randomUUID();
  await fs.writeFile(
    layout.metadataPath,
    encodeDomainMetadata({ domainId: id, name: 'bench', ctimeMs: Date.now(), maxVolumes, ioTimeoutSeconds: 10, leaseSlotSize: MiB, firstVolumeSlot: 3 }),
  );
  await fs.writeFile(layout.idsPath, Buffer.alloc(0));
  await fs.writeFile(layout.leasesPath, Buffer.alloc(0));
  return { id, path: root };
}

const record = (domainId: string, imageId: string, volumeId: string, leaseSlot: number): VolumeRecord => ({
  volumeId,
  imageId,
  domainId,
  parentId: '',
  format: 'RAW',
  allocation: 'SPARSE',
  capacityBytes: MiB,
  legality: 'LEGAL',
  generation: 0,
  ctimeMs: Date.now() - 3600_000,
  description: '',
  leaseSlot,
});

/** A volume: record + 4 KiB of data in a 1 MiB sparse file. */
async function writeVolume(dir: string, metaName: string, dataName: string, r: VolumeRecord): Promise<void> {
  await fs.writeFile(path.join(dir, metaName), encodeVolumeRecord(r));
  const h = await fs.open(path.join(dir, dataName), 'w');
  await h.write(Buffer.alloc(4096, 1), 0, 4096, 0);
  await h.truncate(MiB);
  await h.close();
}

/** n garbage items: a quarter uncommitted images, a quarter deleted images, half deleted-volume (record + data) pairs. */
async function makeGarbage(domain: DomainRef, n: number): Promise<void> {
  const layout = new DomainLayout(domain.path);
  const old = Date.now() - 3600_000;
  const quarter = Math.floor(n / 4);
  let slot = 3;
  for (let i = 0; i < quarter; i++) {
    const [img, vol] = [randomUUID(), randomUUID()];
    const dir = layout.txImageDir(newTxId(1, 1000, old), img);
    await fs.mkdir(dir);
    await writeVolume(dir, volumeMetaName(vol), vol, record(domain.id, img, vol, slot++));
  }
  for (let i = 0; i < quarter; i++) {
    const [img, vol] = [randomUUID(), randomUUID()];
    const dir = layout.deletedImageDir(img, old);
    await fs.mkdir(dir);
    await writeVolume(dir, volumeMetaName(vol), vol, record(domain.id, img, vol, slot++));
  }
  // Deleted volumes beside a committed one, 50 per image.
  const pairs = Math.floor((n - 2 * quarter) / 2);
  for (let i = 0; i < pairs; i += 50) {
    const img = randomUUID();
    const dir = layout.imageDir(img);
    await fs.mkdir(dir);
    const keep = randomUUID();
    await writeVolume(dir, volumeMetaName(keep), keep, record(domain.id, img, keep, slot++));
    for (let j = 0; j < 50 && i + j < pairs; j++) {
      const vol = randomUUID();
      await writeVolume(dir, deletedVolumeMetaName(vol, old), deletedVolumeDataName(vol, old), record(domain.id, img, vol, slot++));
    }
  }
}

async function makeCommitted(domain: DomainRef, n: number): Promise<void> {
  const layout = new DomainLayout(domain.path);
  for (let i = 0; i < n; i++) {
    const [img, vol] = [randomUUID(), randomUUID()];
    await fs.mkdir(layout.imageDir(img));
    await writeVolume(layout.imageDir(img), volumeMetaName(vol), vol, record(domain.id, img, vol, 3 + i));
  }
}

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; result: T }> {
  const t = process.hrtime.bigint();
  const result = await fn();
  return { ms: Number(process.hrtime.bigint() - t) / 1e6, result };
}

const PARALLEL_ITEMS = 8;

function collector(leases: GcLeaseProvider): GarbageCollector {
  return new GarbageCollector({ leases, hostName: os.hostname(), graceMs: 0, metrics: new GcMetrics(new Registry()), parallelItems: PARALLEL_ITEMS });
}

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 10000);
  const dir = await fs.mkdtemp(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-gc-'));
  try {
    console.log(`gc-collect: ${n} items / ${n} committed volumes (${os.cpus().length} cores, ${dir})\n`);

    // 1. Collect n garbage items, and rm -rf the same garbage on a twin domain.
    const garbageDomain = await formatDomain(path.join(dir, 'garbage'), n + 100);
    const twin = await formatDomain(path.join(dir, 'twin'), n + 100);
    await makeGarbage(garbageDomain, n);
    await makeGarbage(twin, n);
    const found = (await findGarbage(garbageDomain.path)).length;
    const leases = new CountingLeases();
    const pass = await timed(() => collector(leases).collect(garbageDomain.path));
    const left = (await findGarbage(garbageDomain.path)).length;
    const floor = await timed(async () => {
      for (const g of await findGarbage(twin.path)) await fs.rm(path.join(twin.path, g.relativePath), { recursive: true, force: true });
    });
    console.log(
      `collect ${found} garbage items:       ${(pass.ms / 1000).toFixed(2)} s  (${(pass.ms / found).toFixed(3)} ms/item, ${pass.result.itemsRemoved} removed, ${left} left, ${pass.result.errors.length} errors)`,
    );
    console.log(
      `  baseline: list + rm -rf the same:  ${(floor.ms / 1000).toFixed(2)} s  → gc/baseline ${(pass.ms / floor.ms).toFixed(2)}x (the gc also fsyncs every directory it changes)`,
    );
    console.log(
      `  ${pass.result.domainLeaseBatches} domain-lease batches (≤ 250 ms each, ${PARALLEL_ITEMS} items at once), of which pauses between them (50 ms each, so waiting creates get the lease): ${(((pass.result.domainLeaseBatches - 1) * 50) / 1000).toFixed(1)} s`,
    );
    console.log(`  lease round trips a real pass adds: ${leases.volumeLeases} volume leases + ${leases.domainLeases} domain-lease batches`);

    // 2. A pass on n committed volumes and no garbage, and a bare readdir walk.
    const big = await formatDomain(path.join(dir, 'committed'), n + 100);
    await makeCommitted(big, n);
    const idle = await timed(() => collector(new CountingLeases()).collect(big.path));
    const dry = await timed(() => collector(new CountingLeases()).list(big.path));
    const walk = await timed(async () => {
      const images = await fs.readdir(new DomainLayout(big.path).imagesDir);
      for (const img of images) await fs.readdir(path.join(new DomainLayout(big.path).imagesDir, img));
    });
    console.log(`\npass on ${n} committed volumes, no garbage: ${idle.ms.toFixed(0)} ms (found ${idle.result.itemsFound})`);
    console.log(`  dry run (ListGarbage):             ${dry.ms.toFixed(0)} ms`);
    console.log(`  baseline: readdir of every image:  ${walk.ms.toFixed(0)} ms  → pass/baseline ${(idle.ms / walk.ms).toFixed(2)}x`);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
