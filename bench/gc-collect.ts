/**
 * GC pass cost on big domains, next to the file-system floor measured in the same run:
 *   1. collecting 10 000 garbage items (uncommitted images, deleted images, deleted volumes'
 *      records and data) vs. a plain recursive delete of the same files;
 *   2. a pass on a domain with 10 000 committed volumes and no garbage vs. a bare readdir walk.
 *
 * The domains are written directly with the storage module (records, sparse data files,
 * marker names exactly as metadata-tx writes them) to keep setup fast. The 10 000-item pass
 * runs twice, on two copies of the garbage:
 *   - with real leases, as deployed (`workers`): a sanlock daemon, the lease-manager, the domain's
 *     lockspace and every deleted volume's lease area formatted on the domain's `dom_md/leases`,
 *     and the GC's GC / domain leases taken through the lease-manager by this process as a
 *     registered LeaseHolder, its volume leases by the gc's lease worker processes
 *     (services/gc/src/leases.ts and lease-workers.ts, what the gc service uses);
 *   - optionally (`one-process`) every lease in this process, as with `--lease-workers 0`;
 *   - with in-process leases (the GC's own cost: listing, checks, unlinks, fsyncs), counting
 *     the lease round trips the real pass makes.
 *
 *   npm run bench -- gc-collect [items=10000] [cases=workers,in-process (also: one-process)] [lease workers=4]
 */
import { fork } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import * as sanlock from '@sdmesh/sanlock';
import {
  createLogger,
  DomainLeases,
  LeaseHolder,
  MAX_HOST_ID,
  deletedVolumeDataName,
  deletedVolumeMetaName,
  DomainLayout,
  encodeDomainMetadata,
  encodeVolumeRecord,
  newVolumeRecord,
  findGarbage,
  newTxId,
  volumeMetaName,
  type DomainRef,
  type VolumeRecord,
} from '@sdmesh/common';
import { GarbageCollector, type BatchRecord, type GcLeaseProvider } from '@sdmesh/gc/dist/collector';
import { LeaseWorkers } from '@sdmesh/gc/dist/lease-workers';
import { sanlockLeases } from '@sdmesh/gc/dist/leases';
import { GcMetrics } from '@sdmesh/gc/dist/metrics';
import { DomainLeaseGroups } from '@sdmesh/metadata-tx/dist/group-commit';
import { runBench, startLeaseManagerStack } from './lib';

const MiB = 1024 * 1024;

/** In-process leases: the domain lease is one lock, the others are always granted. */
class InProcessLeases implements GcLeaseProvider {
  private domainHeld: Promise<void> = Promise.resolve();
  withGcLease<T>(_d: DomainRef, _op: string, fn: () => Promise<T>): Promise<T> {
    return fn();
  }
  private lver = 0;
  async withDomainLease<T>(_d: DomainRef, _op: string, fn: (lease: { lver?: number }) => Promise<T>): Promise<T> {
    const prev = this.domainHeld;
    let release = () => undefined as void;
    this.domainHeld = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn({ lver: ++this.lver });
    } finally {
      release();
    }
  }
  withVolumeLease<T>(_d: DomainRef, _v: string, _s: number, _m: 'exclusive', _op: string, fn: () => Promise<T>): Promise<T> {
    return fn();
  }
}

/** A domain; with a lease stack, its lockspace and reserved leases formatted too (before its metadata, as a domain create does). */
async function formatDomain(root: string, maxVolumes: number, stack?: LeaseStack): Promise<DomainRef> {
  const layout = new DomainLayout(root);
  await fs.mkdir(layout.domMdDir, { recursive: true });
  await fs.mkdir(layout.imagesDir, { recursive: true });
  const domain = { id: randomUUID(), path: root };
  const ioTimeoutSeconds = stack ? 1 : 10;
  await fs.writeFile(layout.idsPath, Buffer.alloc(0));
  await fs.writeFile(layout.leasesPath, Buffer.alloc(0));
  await stack?.leases.formatDomainLeases(domain, ioTimeoutSeconds);
  await fs.writeFile(
    layout.metadataPath,
    encodeDomainMetadata({ domainId: domain.id, name: 'bench', ctimeMs: Date.now(), maxVolumes, ioTimeoutSeconds, leaseSlotSize: MiB, firstVolumeSlot: 3 }),
  );
  return domain;
}

const record = (domainId: string, imageId: string, volumeId: string, leaseSlot: number): VolumeRecord =>
  newVolumeRecord({ volumeId, imageId, domainId, capacityBytes: MiB, ctimeMs: Date.now() - 3600_000, leaseSlot });

/** A volume: record + 4 KiB of data in a 1 MiB sparse file. */
async function writeVolume(dir: string, metaName: string, dataName: string, r: VolumeRecord): Promise<void> {
  await fs.writeFile(path.join(dir, metaName), encodeVolumeRecord(r));
  const h = await fs.open(path.join(dir, dataName), 'w');
  await h.write(Buffer.alloc(4096, 1), 0, 4096, 0);
  await h.truncate(MiB);
  await h.close();
}

/**
 * n garbage items: a quarter uncommitted images, a quarter deleted images, half deleted-volume
 * (record + data) pairs. Returns the committed (now deleted) volumes, whose records the GC
 * removes under their volume lease.
 */
async function makeGarbage(domain: DomainRef, n: number): Promise<{ volumeId: string; slot: number }[]> {
  const leased: { volumeId: string; slot: number }[] = [];
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
    leased.push({ volumeId: vol, slot });
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
      leased.push({ volumeId: vol, slot });
      await writeVolume(dir, deletedVolumeMetaName(vol, old), deletedVolumeDataName(vol, old), record(domain.id, img, vol, slot++));
    }
  }
  return leased;
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

const PARALLEL_ITEMS = Number(process.env.SDMESH_BENCH_GC_PARALLEL_ITEMS ?? 32);

function collector(leases: GcLeaseProvider, onBatch?: (b: BatchRecord) => void): GarbageCollector {
  return new GarbageCollector({ leases, hostName: os.hostname(), graceMs: 0, metrics: new GcMetrics(new Registry()), parallelItems: PARALLEL_ITEMS, onBatch });
}

const msSince = (t: bigint) => Number(process.hrtime.bigint() - t) / 1e6;

/** Wraps a lease provider: counts its leases and times their acquire (call → fn starts) and release (fn ends → call returns). */
class TimedLeases implements GcLeaseProvider {
  readonly volume = { n: 0, acquireMs: 0, releaseMs: 0, busy: 0 };
  readonly domain = { n: 0, acquireMs: 0, releaseMs: 0 };
  constructor(private readonly inner: GcLeaseProvider) {}
  private async time<A extends unknown[], T>(
    into: { n: number; acquireMs: number; releaseMs: number },
    hold: (body: (...lease: A) => Promise<T>) => Promise<T>,
    fn: (...lease: A) => Promise<T>,
  ): Promise<T> {
    const t = process.hrtime.bigint();
    let ended = 0n;
    const result = await hold(async (...lease) => {
      into.n++;
      into.acquireMs += msSince(t);
      try {
        return await fn(...lease);
      } finally {
        ended = process.hrtime.bigint();
      }
    });
    into.releaseMs += msSince(ended);
    return result;
  }
  withGcLease<T>(d: DomainRef, op: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.inner.withGcLease(d, op, fn, signal);
  }
  withDomainLease<T>(d: DomainRef, op: string, fn: (lease: { lver?: number }) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.time(this.domain, (body) => this.inner.withDomainLease(d, op, body, signal), fn);
  }
  async withVolumeLease<T>(
    d: DomainRef,
    v: string,
    slot: number,
    m: 'exclusive',
    op: string,
    fn: () => Promise<T>,
    opts: { signal?: AbortSignal; wait?: boolean },
  ): Promise<T> {
    try {
      return await this.time(this.volume, (body) => this.inner.withVolumeLease(d, v, slot, m, op, body, opts), fn);
    } catch (err) {
      this.volume.busy++;
      throw err;
    }
  }
}

/** The lease-manager stack with this process registered as a lease holder. */
interface LeaseStack {
  holder: LeaseHolder;
  /** The gc's lease worker processes (as the gc service starts them, --lease-workers). */
  workers: LeaseWorkers;
  leases: DomainLeases;
  leaseManagerAddress: string;
  stop(): Promise<void>;
}

/** Sizes of the groups of volume leases the lease workers took, since the last row. */
let groupSizes: number[] = [];
/** Each group's cycle, since the last row: asked → held (a worker's acquire), held (the records' removal), release (the worker's). */
let groupTimes: { acquireMs: number; heldMs: number; releaseMs: number }[] = [];

async function startLeaseStack(dir: string, workerCount: number): Promise<LeaseStack> {
  const stack = await startLeaseManagerStack(dir);
  // The lease workers are processes of their own: they find the daemon by the environment, as the services do.
  Object.assign(process.env, stack.daemon.env);
  try {
    const leaseManagerAddress = `unix:${stack.socket}`;
    const holder = await LeaseHolder.register({ leaseManagerAddress, log: createLogger('bench', 'warn'), onFence: (why) => console.error(why) });
    const workers = new LeaseWorkers({ count: workerCount, leaseManagerAddress, log: createLogger('bench', 'warn') });
    // Counts the groups of volume leases the workers take (one sanlock acquire each).
    const holdVolumes = workers.holdVolumes.bind(workers);
    workers.holdVolumes = (d, volumes, op, fn) => {
      groupSizes.push(volumes.length);
      const asked = performance.now();
      let [held, ended] = [0, 0];
      return holdVolumes(d, volumes, op, async () => {
        held = performance.now();
        try {
          return await fn();
        } finally {
          ended = performance.now();
        }
      }).finally(() => groupTimes.push({ acquireMs: held - asked, heldMs: ended - held, releaseMs: performance.now() - ended }));
    };
    return {
      holder,
      workers,
      leases: new DomainLeases(holder),
      leaseManagerAddress,
      stop: async () => {
        await workers.stop();
        await holder.close();
        await stack.stop();
      },
    };
  } catch (err) {
    await stack.stop();
    throw err;
  }
}

/** A lease area per volume (written by sanlock as the creates' transactions do, 16 at once), and this host joined to the domain's lockspace. */
async function prepareLeases(stack: LeaseStack, domain: DomainRef, volumes: { volumeId: string; slot: number }[]): Promise<void> {
  const leasesPath = new DomainLayout(domain.path).leasesPath;
  for (let i = 0; i < volumes.length; i += 16) {
    await Promise.all(
      volumes
        .slice(i, i + 16)
        .map((v) => sanlock.writeResource({ lockspace: domain.id, name: v.volumeId, path: leasesPath, offset: v.slot * MiB }, { numHosts: MAX_HOST_ID })),
    );
  }
  await stack.leases.ensureJoined(domain, { timeoutMs: 120_000 });
  await stack.workers.start();
}

type Row = {
  name: string;
  ms: number;
  found: number;
  removed: number;
  left: number;
  errors: number;
  batches: number;
  /** Batches with the longer bounds (nobody else held the domain lease since the pass's previous batch). */
  solo: number;
  longestBatchMs: number;
  /** From the pass's start to its first batch (listing, phase 1 without the domain lease), and between batches (release, pause, acquire). */
  beforeFirstBatchMs: number;
  betweenBatchesMs: number;
  /** Sizes of the lease workers' groups of volume leases. */
  groups: number[];
  /** Their cycles. */
  cycles: typeof groupTimes;
  leases: TimedLeases;
  /** CPU by process during the pass. */
  cpu: string;
  /** Memory of the gc and its lease workers during the pass. */
  memory: string;
  /** The machine's disks during the pass. */
  disk: string;
};

async function collectRow(name: string, domain: DomainRef, inner: GcLeaseProvider, workerPids: () => number[] = leaseWorkerPids): Promise<Row> {
  const found = (await findGarbage(domain.path)).length;
  const leases = new TimedLeases(inner);
  const batches: BatchRecord[] = [];
  groupSizes = [];
  groupTimes = [];
  const cpuBefore = cpuOfProcessTree();
  const memory = new MemorySampler(() => [process.pid, ...workerPids()]);
  const diskBefore = diskCounters();
  const passStart = Date.now();
  const pass = await timed(() => collector(leases, (b) => batches.push(b)).collect(domain.path));
  const cpu = cpuUsed(cpuBefore, cpuOfProcessTree(), pass.ms);
  const memoryText = memory.stop();
  const disk = diskUsed(diskBefore, diskCounters(), pass.ms);
  const groups = groupSizes;
  const cycles = groupTimes;
  const left = (await findGarbage(domain.path)).length;
  return {
    name,
    ms: pass.ms,
    found,
    removed: pass.result.itemsRemoved,
    left,
    errors: pass.result.errors.length,
    batches: pass.result.domainLeaseBatches,
    solo: batches.filter((b) => b.solo).length,
    longestBatchMs: Math.max(0, ...batches.map((b) => b.endedAt - b.startedAt)),
    beforeFirstBatchMs: batches.length ? batches[0]!.startedAt - passStart : 0,
    betweenBatchesMs: batches.slice(1).reduce((sum, b, i) => sum + b.startedAt - batches[i]!.endedAt, 0),
    groups,
    cycles,
    leases,
    cpu,
    memory: memoryText,
    disk,
  };
}

/** The lease worker processes started by this process. */
function leaseWorkerPids(): number[] {
  const pids: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === process.pid && roleOf(Number(name)) === 'lease workers') pids.push(Number(name));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/** What a process of this bench's tree is, by its command line (undefined: it exited). */
function roleOf(pid: number): string | undefined {
  let cmd = '';
  try {
    cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return undefined;
  }
  return pid === process.pid
    ? 'gc (this process)'
    : /lease-worker/.test(cmd)
      ? 'lease workers'
      : /lease-manager/.test(cmd)
        ? 'lease-manager'
        : /^sanlock/.test(path.basename(cmd.split('\0')[0] ?? ''))
          ? 'sanlock daemon'
          : /nats-server/.test(cmd)
            ? 'nats-server'
            : 'other';
}

/**
 * The most memory each of this process and the lease workers used during a pass, sampled every
 * 500 ms (reading smaps_rollup costs the kernel a walk of the process's pages) from /proc/<pid>/smaps_rollup: RSS, and what is the process's own (private pages: its
 * heap; the rest is node's binary and libraries, in memory once for every process). A container's
 * memory limit counts the private pages of each process, the shared ones once.
 */
class MemorySampler {
  private readonly max = new Map<number, { role: string; rss: number; own: number }>();
  private readonly timer: NodeJS.Timeout;
  constructor(private readonly pids: () => number[]) {
    this.timer = setInterval(() => this.sample(), 500);
    this.sample();
  }
  private sample(): void {
    for (const pid of this.pids()) {
      try {
        const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
        const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0);
        const [rss, own] = [kib('Rss') / 1024, (kib('Private_Clean') + kib('Private_Dirty')) / 1024];
        const m = this.max.get(pid) ?? { role: roleOf(pid) ?? '?', rss: 0, own: 0 };
        this.max.set(pid, { role: m.role, rss: Math.max(m.rss, rss), own: Math.max(m.own, own) });
      } catch {
        // exited
      }
    }
  }
  stop(): string {
    clearInterval(this.timer);
    this.sample();
    const byRole = new Map<string, { rss: number[]; own: number[] }>();
    for (const m of this.max.values()) {
      const r = byRole.get(m.role) ?? { rss: [], own: [] };
      r.rss.push(m.rss);
      r.own.push(m.own);
      byRole.set(m.role, r);
    }
    const range = (xs: number[]) => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
    return `most memory during the pass (MiB): ${[...byRole]
      .map(([role, r]) => `${role}${r.rss.length > 1 ? ` (${r.rss.length})` : ''} RSS ${range(r.rss)}, private ${range(r.own)}`)
      .join('; ')}`;
  }
}

/** Sectors read and written and ms busy of the machine's whole disks, from /proc/diskstats. */
function diskCounters(): { readBytes: number; writtenBytes: number; busyMs: number } {
  const c = { readBytes: 0, writtenBytes: 0, busyMs: 0 };
  for (const line of readFileSync('/proc/diskstats', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    if (!/^(vd[a-z]+|sd[a-z]+|xvd[a-z]+|nvme\d+n\d+)$/.test(f[2] ?? '')) continue;
    c.readBytes += Number(f[5]) * 512;
    c.writtenBytes += Number(f[9]) * 512;
    c.busyMs += Number(f[12]);
  }
  return c;
}

function diskUsed(before: ReturnType<typeof diskCounters>, after: ReturnType<typeof diskCounters>, wallMs: number): string {
  const GiB = 1024 ** 3;
  const read = after.readBytes - before.readBytes;
  return `disk during the pass: ${(read / GiB).toFixed(2)} GiB read (${(read / 1e6 / (wallMs / 1000)).toFixed(0)} MB/s), ${((after.writtenBytes - before.writtenBytes) / GiB).toFixed(2)} GiB written, busy ${((100 * (after.busyMs - before.busyMs)) / wallMs).toFixed(0)}% of the time`;
}

/** CPU seconds (user, system) of this process and each of its descendants, by role, from /proc. */
type CpuByRole = Map<string, { user: number; sys: number }>;
function cpuOfProcessTree(): CpuByRole {
  const parentOf = new Map<number, number>();
  const stats = new Map<number, string[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      parentOf.set(Number(name), Number(fields[1]));
      stats.set(Number(name), fields);
    } catch {
      // exited meanwhile
    }
  }
  const inTree = (pid: number): boolean => pid === process.pid || (pid > 1 && parentOf.has(pid) && inTree(parentOf.get(pid)!));
  const byRole: CpuByRole = new Map();
  for (const [pid, fields] of stats) {
    if (!inTree(pid)) continue;
    const role = roleOf(pid);
    if (!role) continue;
    const r = byRole.get(role) ?? { user: 0, sys: 0 };
    // utime, stime in clock ticks (100/s)
    r.user += Number(fields[11]) / 100;
    r.sys += Number(fields[12]) / 100;
    byRole.set(role, r);
  }
  return byRole;
}

/** CPU used by each role between two samples, and in all, as text. */
function cpuUsed(before: CpuByRole, after: CpuByRole, wallMs: number): string {
  let total = 0;
  const parts: string[] = [];
  for (const [role, a] of [...after].sort((x, y) => y[1].user + y[1].sys - (x[1].user + x[1].sys))) {
    const b = before.get(role) ?? { user: 0, sys: 0 };
    const [user, sys] = [a.user - b.user, a.sys - b.sys];
    if (user + sys < 0.05) continue;
    total += user + sys;
    parts.push(`${role} ${(user + sys).toFixed(2)} s (user ${user.toFixed(2)}, sys ${sys.toFixed(2)})`);
  }
  return `CPU during the pass: ${parts.join(', ')}; in all ${total.toFixed(2)} s = ${((100 * total) / (wallMs / 1000)).toFixed(0)}% of one core over the pass (${os.cpus().length} cores)`;
}

const percentile = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))] ?? 0;
const waits = (xs: number[]) => [50, 99, 100].map((p) => percentile(xs, p).toFixed(0)).join(' / ');

/**
 * A process of this host creating as metadata-tx does (DomainLeaseGroups over this host's
 * lease-manager: tries, looks at the lease on storage, turns), a 5 ms transaction every 50 ms;
 * answers with the wait of each (asked → running under the lease).
 */
async function localCreates(domain: DomainRef): Promise<void> {
  const holder = await LeaseHolder.register({ leaseManagerAddress: process.env.SDMESH_BENCH_LEASE_MANAGER!, log: createLogger('bench-creates', 'warn') });
  const groups = new DomainLeaseGroups(new DomainLeases(holder));
  let waited: number[] = [];
  let stopping = false;
  const inFlight = new Set<Promise<void>>();
  process.on('message', (m: string) => {
    if (m === 'sample') {
      process.send?.(waited);
      waited = [];
    } else stopping = true;
  });
  process.send?.('ready');
  while (!stopping) {
    const asked = performance.now();
    const create = groups
      .run(domain, 'bench-create', async () => {
        waited.push(performance.now() - asked);
        await new Promise((r) => setTimeout(r, 5));
      })
      .finally(() => inFlight.delete(create));
    inFlight.add(create);
    await new Promise((r) => setTimeout(r, 50));
  }
  await Promise.all(inFlight);
  await new Promise<void>((resolve) => process.send?.(waited, () => resolve()));
}

async function startLocalCreates(stack: LeaseStack, domain: DomainRef): Promise<{ sample(ms: number): Promise<number[]>; stop(): Promise<number[]> }> {
  const child = fork(__filename, ['--local-creates', JSON.stringify(domain)], {
    env: { ...process.env, SDMESH_BENCH_LEASE_MANAGER: stack.leaseManagerAddress },
  });
  const next = () => new Promise<unknown>((resolve) => child.once('message', resolve));
  await next(); // ready
  return {
    sample: async (ms) => {
      await new Promise((r) => setTimeout(r, ms));
      child.send('sample');
      return (await next()) as number[];
    },
    stop: async () => {
      child.send('stop');
      return (await next()) as number[];
    },
  };
}

const load = () =>
  os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(' ');

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 10000);
  const cases = (process.argv[3] ?? 'workers,in-process').split(',');
  const workerCount = Number(process.argv[4] ?? 4);
  for (const c of cases)
    if (!['workers', 'one-process', 'in-process', 'creates'].includes(c))
      throw new Error(`leases: workers, one-process, in-process or creates (comma-separated), not "${c}"`);
  const dir = await fs.mkdtemp(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-gc-'));
  let stack: LeaseStack | undefined;
  try {
    console.log(`gc-collect: ${n} items / ${n} committed volumes (${os.cpus().length} cores, ${dir}, load average ${load()})\n`);

    // 1. Collect n garbage items (with real leases, with in-process ones), and rm -rf the same garbage on a twin domain.
    const rows: Row[] = [];
    for (const c of cases.filter((k) => k !== 'in-process')) {
      stack ??= await startLeaseStack(dir, workerCount);
      const real = await formatDomain(path.join(dir, `garbage-${c}`), n + 100, stack);
      const volumes = await makeGarbage(real, n);
      const prep = await timed(() => prepareLeases(stack!, real, volumes));
      console.log(`setup (${c}): ${volumes.length} volume lease areas formatted and the lockspace joined in ${(prep.ms / 1000).toFixed(1)} s`);
      const name = {
        workers: `sanlock, ${workerCount} lease workers`,
        'one-process': 'sanlock, one process',
        creates: `sanlock, ${workerCount} lease workers, local creates`,
      }[c]!;
      const leases = sanlockLeases(stack.holder, c === 'one-process' ? undefined : stack.workers);
      if (c !== 'creates') {
        rows.push(await collectRow(name, real, leases));
        continue;
      }
      // Fairness: another process of this host waiting for the domain lease as metadata-tx does, a create every 50 ms.
      const creates = await startLocalCreates(stack, real);
      const idle = await creates.sample(2000);
      rows.push(await collectRow(name, real, leases));
      const during = await creates.stop();
      console.log(
        `creates of another local process (its real group commit, a 5 ms transaction every 50 ms): wait for the domain lease p50 / p99 / max ${waits(idle)} ms before the pass (${idle.length}), ${waits(during)} ms during it (${during.length})`,
      );
    }
    if (cases.includes('in-process')) {
      const fake = await formatDomain(path.join(dir, 'garbage'), n + 100);
      await makeGarbage(fake, n);
      rows.push(await collectRow('in-process', fake, new InProcessLeases()));
    }
    const twin = await formatDomain(path.join(dir, 'twin'), n + 100);
    await makeGarbage(twin, n);
    const floor = await timed(async () => {
      for (const g of await findGarbage(twin.path)) await fs.rm(path.join(twin.path, g.relativePath), { recursive: true, force: true });
    });
    for (const r of rows) {
      const v = r.leases.volume;
      const d = r.leases.domain;
      console.log(
        `collect ${r.found} garbage items (${r.name} leases): ${(r.ms / 1000).toFixed(2)} s  (${(r.ms / r.found).toFixed(3)} ms/item, ${r.removed} removed, ${r.left} left, ${r.errors} errors)  → gc/baseline ${(r.ms / floor.ms).toFixed(2)}x`,
      );
      console.log(`  ${r.cpu}`);
      console.log(`  ${r.memory}`);
      console.log(`  ${r.disk}`);
      if (r.groups.length)
        console.log(
          `  ${r.groups.length} acquires of volume leases by the workers (mean ${(r.groups.reduce((a, b) => a + b, 0) / r.groups.length).toFixed(1)} leases each)`,
        );
      if (r.cycles.length) {
        const sum = (k: keyof (typeof r.cycles)[number]) => r.cycles.reduce((a, c) => a + c[k], 0);
        const [acq, held, rel] = [sum('acquireMs'), sum('heldMs'), sum('releaseMs')];
        console.log(
          `  a group's cycle (mean): acquire ${(acq / r.cycles.length).toFixed(1)} ms, held for the records ${(held / r.cycles.length).toFixed(1)} ms, release ${(rel / r.cycles.length).toFixed(1)} ms; groups out at once (mean over the pass): in acquire ${(acq / r.ms).toFixed(2)}, held ${(held / r.ms).toFixed(2)}, in release ${(rel / r.ms).toFixed(2)}`,
        );
      }
      console.log(
        `  ${v.n} volume leases (${v.busy} not granted): acquire ${(v.acquireMs / Math.max(1, v.n)).toFixed(2)} ms, release ${(v.releaseMs / Math.max(1, v.n)).toFixed(2)} ms each (mean; ${PARALLEL_ITEMS} items at once)`,
      );
      console.log(
        `  ${r.batches} domain-lease batches (${r.solo} of them solo: ≤ 1000 ms, else ≤ 250 ms; longest ${r.longestBatchMs} ms; pauses of 50 ms between them: ${(((r.batches - 1) * 50) / 1000).toFixed(1)} s): acquire ${(d.acquireMs / Math.max(1, d.n)).toFixed(2)} ms, release ${(d.releaseMs / Math.max(1, d.n)).toFixed(2)} ms each (mean)`,
      );
      console.log(
        `  before the first batch (listing, data without the domain lease): ${(r.beforeFirstBatchMs / 1000).toFixed(2)} s; between batches (fsyncs done; release, pause, acquire): ${(r.betweenBatchesMs / 1000).toFixed(2)} s`,
      );
    }
    console.log(
      `  baseline: list + rm -rf the same:  ${(floor.ms / 1000).toFixed(2)} s (the gc also fsyncs every directory it changes); load average ${load()}`,
    );

    // 2. A pass on n committed volumes and no garbage, and a bare readdir walk.
    const big = await formatDomain(path.join(dir, 'committed'), n + 100);
    await makeCommitted(big, n);
    const idle = await timed(() => collector(new InProcessLeases()).collect(big.path));
    const dry = await timed(() => collector(new InProcessLeases()).list(big.path));
    const walk = await timed(async () => {
      const images = await fs.readdir(new DomainLayout(big.path).imagesDir);
      for (const img of images) await fs.readdir(path.join(new DomainLayout(big.path).imagesDir, img));
    });
    console.log(`\npass on ${n} committed volumes, no garbage (in-process leases): ${idle.ms.toFixed(0)} ms (found ${idle.result.itemsFound})`);
    console.log(`  dry run (ListGarbage):             ${dry.ms.toFixed(0)} ms`);
    console.log(`  baseline: readdir of every image:  ${walk.ms.toFixed(0)} ms  → pass/baseline ${(idle.ms / walk.ms).toFixed(2)}x`);
  } finally {
    await stack?.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) await fs.rm(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--local-creates') runBench(() => localCreates(JSON.parse(process.argv[3]!) as DomainRef));
else runBench(main);
