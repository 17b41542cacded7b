import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  DomainLayout,
  listCommittedImageIds,
  listVolumeRecords,
  monotonicMicros,
  orderChain,
  pb,
  readDomainMetadata,
  SdmeshError,
  type AuditLine,
} from '@sdmesh/common';
import { checkDomain } from '@sdmesh/sdmctl';
import { check, emptyObservation, type ExpectedDisk, type Observed, type Violation } from './checker';
import { FaultInjector, planFaults, type PlannedFault } from './faults';
import { History, type HistoryLine } from './history';
import { alive, ChaosMesh, MiB, type PublicApi } from './mesh';
import { Rng } from './rng';
import { diskOf, LoopFs } from './storage';
import { StorageFaults } from './storage-faults';
import { Client, importHashes, matchesHistory, readDisk, type DiskModel, type WorkloadContext } from './workload';

export interface ChaosOptions {
  seed: number;
  faults: number;
  /** How long the load runs with faults spread over it (ms). */
  durationMs: number;
  hosts: number;
  clients: number;
  natsNodes: number;
  /** Work directory (default: a new one under SDMESH_TEST_DIR or /var/tmp, removed after a clean run unless SDMESH_KEEP_TEST_DIRS is set). */
  dir?: string;
  /** Negative controls: brokenForTest switches (packages/common/src/audit.ts) turned on in every service. */
  broken?: string[];
  /** Copy throttle, so that faults land in copies (bytes/s). */
  copyRateLimit?: number;
  /**
   * Storage faults (needs root): a third domain on a small loop-mounted ext4 file system, and the
   * fill-domain, slow-storage and lockspace-unwritable faults in the plan.
   */
  storageFaults?: boolean;
  log?: (line: string) => void;
}

export interface ChaosReport {
  seed: number;
  hosts: number;
  natsNodes: number;
  clients: number;
  durationMs: number;
  storageFaults: boolean;
  /** Load average (1 min) at the start and the end of the load: the machine is shared. */
  load: { start: number; end: number };
  /** Wall time of the whole run, settle and check included (ms). */
  wallMs: number;
  plannedFaults: number;
  injected: Record<string, number>;
  /** Planned faults that found nothing to hit (no copy running at that moment ...). */
  missed: Record<string, number>;
  operations: Record<string, number>;
  auditLines: number;
  disksAtEnd: number;
  violations: Array<Violation & { excerpt: string[] }>;
  dir: string;
  reproduce: string;
}

const TERMINAL = [pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED];

/** Calls `fn` on either replica until one answers (a replica may still be starting after the settle). */
async function onAnyReplica<T>(apis: PublicApi[], fn: (api: PublicApi) => Promise<T>, timeoutMs = 60_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn(apis[attempt % apis.length]!);
    } catch (err) {
      const code = SdmeshError.fromGrpc(err).code;
      if (![1, 2, 4, 13, 14].includes(code) || Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

async function waitOperation(apis: PublicApi[], name: string, timeoutMs = 180_000): Promise<pb.Operation> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const op = await onAnyReplica(apis, (api) => api.ops.waitOperation({ name, timeoutSeconds: 5 }, { timeoutMs: 10_000 }));
    if (TERMINAL.includes(op.status)) return op;
    if (Date.now() > until) throw new Error(`operation ${name} did not end`);
  }
}

/** sha256 of every file under `root`, skipping the directories in `skip` (relative names). */
function fileHashes(root: string, skip: Set<string>): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (skip.has(path.relative(root, p))) continue;
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) out.set(p, crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex'));
    }
  };
  if (fs.existsSync(root)) walk(root);
  return out;
}

/** Follows the audit trail as it grows and watches each writer pid: when it was last seen alive and first seen gone. */
class PidWatch {
  readonly lines: AuditLine[] = [];
  readonly deaths = new Map<number, { lastAlive: number; firstDead: number }>();
  private readonly watched = new Map<number, number>();
  private offset = 0;
  private rest = '';
  private timer?: NodeJS.Timeout;

  constructor(private readonly file: string) {}

  start(): void {
    this.timer = setInterval(() => this.poll(), 100);
  }

  poll(): void {
    if (fs.existsSync(this.file)) {
      const fd = fs.openSync(this.file, 'r');
      try {
        const size = fs.fstatSync(fd).size;
        if (size > this.offset) {
          const buf = Buffer.alloc(size - this.offset);
          fs.readSync(fd, buf, 0, buf.length, this.offset);
          this.offset = size;
          const text = this.rest + buf.toString('utf8');
          const parts = text.split('\n');
          this.rest = parts.pop() ?? '';
          for (const p of parts) {
            if (!p.trim()) continue;
            const line = JSON.parse(p) as AuditLine;
            this.lines.push(line);
            if (!this.deaths.has(line.pid) && !this.watched.has(line.pid)) this.watched.set(line.pid, line.t);
          }
        }
      } finally {
        fs.closeSync(fd);
      }
    }
    const now = monotonicMicros();
    for (const [pid] of this.watched) {
      if (alive(pid)) this.watched.set(pid, now);
      else {
        this.deaths.set(pid, { lastAlive: this.watched.get(pid)!, firstDead: now });
        this.watched.delete(pid);
      }
    }
  }

  stop(): void {
    clearInterval(this.timer);
    this.poll();
  }
}

/**
 * One chaos run (docs/chaos.md): a real mesh, a continuous mixed load from several clients, the
 * seeded fault plan, then the settle (faults stop, every process runs again), a GC pass and the
 * checker. Returns the report; the work directory is kept when a violation was found.
 */
export async function runChaos(o: ChaosOptions): Promise<ChaosReport> {
  const log = o.log ?? (() => undefined);
  const wallStart = Date.now();
  const base = process.env.SDMESH_TEST_DIR ?? '/var/tmp';
  const dir = o.dir ?? fs.mkdtempSync(path.join(base, `sdmesh-chaos-${o.seed}-`));
  const auditFile = path.join(dir, 'audit.jsonl');
  const importDir = path.join(dir, 'imports');
  const scratch = path.join(dir, 'scratch');
  for (const d of [dir, importDir, scratch]) fs.mkdirSync(d, { recursive: true });
  const env: NodeJS.ProcessEnv = {
    SDMESH_AUDIT_LOG: auditFile,
    SDMESH_IO_TIMEOUT: '1',
    SDMESH_EVENT_HEARTBEAT_MS: '0',
    SDMESH_COPY_RATE_LIMIT: String(o.copyRateLimit ?? 4 * MiB),
    SDMESH_IMPORT_DIRS: importDir,
    // The GC: a pass every 5 s on garbage older than 3 s, so it runs under the faults too.
    SDMESH_INTERVAL_MS: '5000',
    SDMESH_GRACE_MS: '3000',
    ...(o.broken?.length ? { SDMESH_CHAOS_TEST: '1', SDMESH_BROKEN: o.broken.join(',') } : {}),
  };
  // The small domain's file system is a storage root of its own: a domain never spans two file systems.
  const smallRoot = path.join(dir, 'small');
  if (o.storageFaults) env.SDMESH_STORAGE_ROOTS = `${path.join(dir, 'storage')},${smallRoot}`;
  const mesh = new ChaosMesh({ dir, hosts: o.hosts, env, natsNodes: o.natsNodes });
  const history = new History(path.join(dir, 'history.jsonl'));
  const watch = new PidWatch(auditFile);
  const plan: PlannedFault[] = planFaults(o.seed, o.faults, o.durationMs, o.hosts, { storage: o.storageFaults });
  let storage: StorageFaults | undefined;
  fs.writeFileSync(path.join(dir, 'plan.json'), JSON.stringify(plan, null, 1));
  let apis: PublicApi[] = [];
  // The work directory stays when the run found a violation (or failed), for its logs and history.
  let keep = true;
  try {
    log(
      `chaos: seed ${o.seed}, ${o.faults} faults over ${o.durationMs / 1000} s, ${o.hosts} hosts, ${o.natsNodes} NATS node(s), ${o.clients} clients; dir ${dir}`,
    );
    let loop: LoopFs | undefined;
    if (o.storageFaults) {
      // The fill fault's filler goes beside the domain's directory, on its file system.
      loop = await LoopFs.create(path.join(dir, 'small-domain.img'), smallRoot, 384 * MiB);
      storage = new StorageFaults(mesh, loop, [diskOf(dir), loop.disk], `sdmesh-chaos-${process.pid}-${o.seed}`);
    }
    await mesh.start();
    apis = mesh.publicApis();
    const healthy = async (api: PublicApi) => {
      const until = Date.now() + 120_000;
      for (;;) {
        const hosts = await api.hosts.listHosts({}).catch(() => undefined);
        if (hosts && hosts.hosts.filter((h) => h.healthy).length >= o.hosts) return;
        if (Date.now() > until) throw new Error(`hosts not healthy: ${JSON.stringify(hosts?.hosts.map((h) => [h.name, h.healthy]))}`);
        await new Promise((r) => setTimeout(r, 500));
      }
    };
    await Promise.all(apis.map(healthy));
    const domains: pb.StorageDomain[] = [];
    const domainDirs = [
      path.join(mesh.mesh.storageDir, 'chaos-a'),
      path.join(mesh.mesh.storageDir, 'chaos-b'),
      ...(loop ? [path.join(smallRoot, 'chaos-c')] : []),
    ];
    for (const domainDir of domainDirs) {
      const name = path.basename(domainDir);
      // The small domain: new allocations refused below 32 MiB free (the default reserve is 5 GiB).
      const thresholds = domainDir.startsWith(smallRoot) ? { criticalFreeBytes: 32 * MiB, warningFreePercent: 20 } : {};
      const op = await onAnyReplica(apis, (api) => api.domains.createStorageDomain({ requestId: `create-${name}`, name, path: domainDir, ...thresholds }));
      const done = await waitOperation(apis, op.name);
      if (done.result?.$case !== 'storageDomain') throw new Error(`domain ${name} not created: ${JSON.stringify(pb.Operation.toJSON(done))}`);
      domains.push(done.result.storageDomain);
    }
    // Files outside the domains that nothing may touch: a sentinel next to them, and the imports' seed file.
    fs.mkdirSync(path.join(mesh.mesh.storageDir, 'outside'), { recursive: true });
    fs.writeFileSync(path.join(mesh.mesh.storageDir, 'outside', 'sentinel.raw'), crypto.randomBytes(MiB));
    fs.writeFileSync(path.join(importDir, 'seed.raw'), crypto.randomBytes(MiB));
    // Both storage roots: the small one's filler is gone by the check (the settle removes it).
    const roots = loop ? [mesh.mesh.storageDir, smallRoot] : [mesh.mesh.storageDir];
    if (loop) fs.writeFileSync(path.join(smallRoot, 'sentinel.raw'), crypto.randomBytes(MiB));
    const outsideHashes = () => new Map(roots.flatMap((r) => [...fileHashes(r, new Set(domains.map((d) => path.relative(r, d.path))))]));
    const outsideBefore = outsideHashes();

    const supervisorRng = new Rng(o.seed ^ 0x5eed);
    mesh.supervise(history, () => supervisorRng.int(500, 3000));
    watch.start();
    const disks = new Map<string, DiskModel>();
    const ctx: WorkloadContext = {
      apis,
      history,
      domains,
      hosts: mesh.mesh.hosts.map((h) => h.name),
      importDir,
      workDir: scratch,
      disks,
      opTimeoutMs: 300_000,
    };
    const clients = Array.from({ length: o.clients }, (_, i) => new Client(i, o.seed, ctx));
    const stopLoad = new AbortController();
    const stopFaults = new AbortController();
    history.add({ kind: 'phase', phase: 'load' });
    const loops = clients.map((c) => c.loop(stopLoad.signal));
    const injector = new FaultInjector(mesh, history, storage);
    const startedAt = Date.now();
    const loadStart = os.loadavg()[0]!;
    const progress = setInterval(() => {
      const done = history.events.filter((e) => e.kind === 'fault').length;
      log(
        `chaos: ${Math.round((Date.now() - startedAt) / 1000)} s, ${done}/${o.faults} faults, ${history.events.filter((e) => e.kind === 'outcome').length} operations ended`,
      );
    }, 30_000);
    await injector.run(plan, startedAt, stopFaults.signal);
    const rest = startedAt + o.durationMs - Date.now();
    if (rest > 0) await new Promise((r) => setTimeout(r, rest));

    // Settle: no more faults, every process running again, the clients finish what they started.
    const loadEnd = os.loadavg()[0]!;
    history.add({ kind: 'phase', phase: 'settle' });
    log('chaos: settling');
    stopFaults.abort();
    injector.settle();
    stopLoad.abort();
    await mesh.waitAllRunning(180_000);
    await Promise.all(apis.map(healthy));
    await Promise.all(loops);
    clearInterval(progress);
    history.add({ kind: 'phase', phase: 'check' });
    log('chaos: checking');

    const observed = await observe(mesh, apis, domains, disks, scratch);
    const outsideAfter = outsideHashes();
    for (const [p, h] of outsideBefore) if (outsideAfter.get(p) !== h) observed.outsideChanges.push(`${p} ${outsideAfter.has(p) ? 'changed' : 'vanished'}`);
    for (const p of outsideAfter.keys()) if (!outsideBefore.has(p)) observed.outsideChanges.push(`${p} appeared`);
    for (const f of fs.readdirSync(importDir)) {
      const p = path.join(importDir, f);
      const expectedHash = importHashes.get(p);
      if (expectedHash && expectedHash !== crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex')) observed.outsideChanges.push(`${p} changed`);
    }
    watch.stop();
    observed.deaths = watch.deaths;
    observed.end = monotonicMicros();
    const expected: ExpectedDisk[] = [...disks.values()].map((d) => ({ id: d.id, domainId: d.domainId }));
    const violations = check(history.events, watch.lines, expected, observed).map((v) => ({ ...v, excerpt: excerpt(history.events, watch.lines, v) }));
    const operations: Record<string, number> = {};
    for (const c of clients) for (const [k, n] of Object.entries(c.outcomes)) operations[k] = (operations[k] ?? 0) + n;
    const report: ChaosReport = {
      seed: o.seed,
      hosts: o.hosts,
      natsNodes: o.natsNodes,
      clients: o.clients,
      durationMs: o.durationMs,
      storageFaults: !!o.storageFaults,
      load: { start: loadStart, end: loadEnd },
      wallMs: Date.now() - wallStart,
      plannedFaults: plan.length,
      injected: injector.injected,
      missed: injector.missed,
      operations,
      auditLines: watch.lines.length,
      disksAtEnd: disks.size,
      violations,
      dir,
      reproduce: `npm run chaos -- --seed ${o.seed} --faults ${o.faults} --duration ${Math.round(o.durationMs / 1000)}s --hosts ${o.hosts} --clients ${o.clients} --nats-nodes ${o.natsNodes}${o.storageFaults ? ' --storage-faults' : ''}${o.broken?.length ? ` --broken ${o.broken.join(',')}` : ''}`,
    };
    fs.writeFileSync(path.join(dir, 'report.json'), JSON.stringify(report, null, 1));
    keep = violations.length > 0 || !!process.env.SDMESH_KEEP_TEST_DIRS;
    return report;
  } finally {
    watch.stop();
    history.close();
    for (const api of apis) api.close();
    storage?.undoAll();
    await mesh.stop();
    await storage?.destroy().catch((err: unknown) => log(`chaos: storage faults not cleaned up: ${String(err)}`));
    if (!keep && !o.dir) fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** What the settled mesh shows, through the public API, the per-host services and the storage itself. */
async function observe(mesh: ChaosMesh, apis: PublicApi[], domains: pb.StorageDomain[], disks: Map<string, DiskModel>, scratch: string): Promise<Observed> {
  const obs = emptyObservation();
  // 1. Operations: every one listed has ended.
  let pageToken = '';
  do {
    const page = await onAnyReplica(apis, (api) => api.ops.listOperations({ pageSize: 500, pageToken }));
    for (const op of page.operations)
      if (!TERMINAL.includes(op.status)) obs.unfinishedOperations.push({ name: op.name, status: pb.operationStatusToJSON(op.status) });
    pageToken = page.nextPageToken;
  } while (pageToken);

  // 2. Disks: listed, LEGAL, their content.
  for (const d of domains) {
    const { disks: listed } = await onAnyReplica(apis, (api) => api.disks.listDisks({ storageDomainId: d.id }));
    for (const l of listed) obs.listedDisks.push({ id: l.id, domainId: d.id, legal: l.legality === pb.Legality.LEGALITY_LEGAL });
  }
  // A disk the history does not know: the operations that name it, for the violation's excerpt.
  for (const l of obs.listedDisks.filter((x) => !disks.has(x.id))) {
    const { operations } = await onAnyReplica(apis, (api) => api.ops.listOperations({ filter: `disk=${l.id}`, pageSize: 20 })).catch(() => ({
      operations: [] as pb.Operation[],
    }));
    l.operations = operations.map((op) => op.name);
  }
  for (const m of disks.values()) {
    const disk = await onAnyReplica(apis, (api) => api.disks.getDisk({ storageDomainId: m.domainId, diskId: m.id })).catch(() => undefined);
    if (!disk) continue; // not listed: the checker reports it
    const got = await readDisk(disk, scratch).catch((err: unknown) => Buffer.from(String(err)));
    const ok = matchesHistory(got, m);
    obs.contents.push({ id: m.id, ok, detail: ok ? undefined : `${got.length} bytes read, capacity ${m.capacity}, ${m.writes.length} patterns written` });
  }

  // 1. No lease is held any more once nothing runs (waiting a little for holders that are just exiting).
  for (let attempt = 0; attempt < 20; attempt++) {
    obs.heldLeases = [];
    for (const host of mesh.mesh.hosts) {
      const lm = mesh.hostClient(host, 'lease-manager', pb.LeaseManagerServiceDefinition);
      try {
        const { leases } = await lm.listHeldLeases({});
        for (const l of leases) {
          const resource = l.location?.resource ?? '';
          // The GC's lease stays with each domain's active collector (SPM with the SPM host) by design;
          // the domain metadata lease and every volume's must be free.
          if (['GC', 'SPM'].includes(resource)) continue;
          obs.heldLeases.push({ host: host.name, lockspace: l.location?.lockspace ?? '', resource, pid: l.holderPid, mode: pb.leaseModeToJSON(l.mode) });
        }
      } finally {
        lm.close();
      }
    }
    if (!obs.heldLeases.length) break;
    await new Promise((r) => setTimeout(r, 1000));
  }

  // 1. Locks: a disk-locking operation on each disk is accepted and ends (an engine lock left behind would refuse it).
  await Promise.all(
    [...disks.values()]
      .filter((m) => !m.template)
      .map(async (m) => {
        try {
          const op = await onAnyReplica(apis, (api) =>
            api.disks.snapshotDisk({ requestId: `final-snapshot-${m.id}`, storageDomainId: m.domainId, diskId: m.id }),
          );
          const done = await waitOperation(apis, op.name, 120_000);
          if (done.status !== pb.OperationStatus.OPERATION_STATUS_DONE) {
            obs.lockedDisks.push({ id: m.id, reason: `final snapshot ${pb.operationStatusToJSON(done.status)}: ${done.error?.message ?? ''}` });
          }
        } catch (err) {
          obs.lockedDisks.push({ id: m.id, reason: `final snapshot refused or not ended: ${SdmeshError.fromGrpc(err).message}` });
        }
      }),
  );
  // 4. GC passes until no garbage, then sdmctl check of every domain.
  const gc = mesh.hostClient(mesh.mesh.hosts[0]!, 'gc', pb.GcServiceDefinition);
  try {
    for (const d of domains) {
      let items: string[] = [];
      // Bounded in all (a GC that never finishes a pass is itself a finding: its garbage stays listed).
      for (const until = Date.now() + 180_000; Date.now() < until;) {
        await gc.collectGarbage({ domainPath: d.path }, { timeoutMs: 60_000 }).catch(() => undefined);
        items = await gc
          .listGarbage({ domainPath: d.path }, { timeoutMs: 30_000 })
          .then((r) => r.items.map((i) => i.relativePath))
          .catch((err: unknown) => [`(garbage not listed: ${String(err).slice(0, 200)})`]);
        if (!items.length) break;
        await new Promise((r) => setTimeout(r, 1500));
      }
      obs.garbage.push({ domain: d.name, items });
      const report = await checkDomain(d.path);
      for (const f of report.violations) obs.checkFindings.push({ domain: d.name, check: f.check, where: f.where, message: f.message });
    }
  } finally {
    gc.close();
  }
  obs.inventory = await inventoryMismatches(apis, domains);
  return obs;
}

/** A volume as the API lists it and as its record on storage says, in the words both share. */
const volumeFacts = (v: { id: string; parentId: string; format: string; legality: string; capacityBytes: number; template: boolean }) =>
  `${v.id} parent=${v.parentId || '-'} ${v.format} ${v.legality} ${v.capacityBytes} bytes${v.template ? ' template' : ''}`;

/**
 * 4. The KV inventory equals storage, after the GC: the scheduler's domain registry
 * (ListStorageDomains, KV) against each domain's metadata on storage, and the disks the API lists
 * (ListDisks) against the images and volume records the storage format readers find in the
 * domain directory — the same disks, the same chains, formats, legality and capacities.
 */
async function inventoryMismatches(apis: PublicApi[], domains: pb.StorageDomain[]): Promise<Observed['inventory']> {
  const out: Observed['inventory'] = [];
  const registered = new Map<string, pb.StorageDomain>();
  let token = '';
  do {
    const page = await onAnyReplica(apis, (api) => api.domains.listStorageDomains({ pageSize: 100, pageToken: token }));
    for (const d of page.storageDomains) registered.set(d.id, d);
    token = page.nextPageToken;
  } while (token);
  for (const r of registered.values())
    if (!domains.some((d) => d.id === r.id)) out.push({ domain: r.name, message: `KV registers domain ${r.id} at ${r.path}, which this run never created` });
  for (const d of domains) {
    const r = registered.get(d.id);
    const md = await readDomainMetadata(d.path).catch((err: unknown) => String(err));
    if (!r) out.push({ domain: d.name, message: `domain ${d.id} is on storage at ${d.path} but not in the KV registry` });
    else if (r.path !== d.path) out.push({ domain: d.name, message: `KV registers domain ${d.id} at ${r.path}, storage has it at ${d.path}` });
    if (typeof md === 'string') out.push({ domain: d.name, message: `domain metadata unreadable: ${md.slice(0, 200)}` });
    else if (md.domainId !== d.id) out.push({ domain: d.name, message: `the metadata at ${d.path} is domain ${md.domainId}, KV says ${d.id}` });

    const listed = new Map<string, string[]>();
    let page = '';
    do {
      const res = await onAnyReplica(apis, (api) => api.disks.listDisks({ storageDomainId: d.id, pageSize: 500, pageToken: page }));
      for (const disk of res.disks)
        listed.set(
          disk.id,
          disk.volumes.map((v) =>
            volumeFacts({
              id: v.id,
              parentId: v.parentId,
              format: pb.volumeFormatToJSON(v.format).replace('VOLUME_FORMAT_', ''),
              legality: pb.legalityToJSON(v.legality).replace('LEGALITY_', ''),
              capacityBytes: v.capacityBytes,
              template: v.template,
            }),
          ),
        );
      page = res.nextPageToken;
    } while (page);
    const stored = new Map<string, string[]>();
    for (const id of await listCommittedImageIds(d.path)) {
      const { records, unreadable } = await listVolumeRecords(new DomainLayout(d.path).imageDir(id), { imageId: id, domainId: d.id });
      for (const u of unreadable) out.push({ domain: d.name, message: `disk ${id}: volume record ${u.volumeId} unreadable on storage: ${u.error.message}` });
      stored.set(
        id,
        orderChain(records).map((r) =>
          volumeFacts({ id: r.volumeId, parentId: r.parentId, format: r.format, legality: r.legality, capacityBytes: r.capacityBytes, template: !!r.template }),
        ),
      );
    }
    for (const [id, chain] of stored) {
      const api = listed.get(id);
      if (!api) out.push({ domain: d.name, message: `disk ${id} is on storage (${chain.length} volumes) but ListDisks does not list it` });
      else if (api.join(' | ') !== chain.join(' | '))
        out.push({ domain: d.name, message: `disk ${id}: ListDisks says [${api.join(' | ')}], storage says [${chain.join(' | ')}]` });
    }
    for (const id of listed.keys()) if (!stored.has(id)) out.push({ domain: d.name, message: `disk ${id} is listed by ListDisks but not on storage` });
  }
  return out;
}

/** The history and audit lines about a violation's ids: what reproduces it with the seed. */
function excerpt(history: HistoryLine[], audit: AuditLine[], v: Violation): string[] {
  const about = v.about.filter((a) => a.length > 2);
  const mentions = (l: HistoryLine | AuditLine) => {
    const s = JSON.stringify(l);
    return about.some((a) => s.includes(a));
  };
  // A call about the ids brings its outcome along (the outcome names the request, not the disk).
  const requests = new Set(history.flatMap((l) => (l.kind === 'call' && mentions(l) ? [l.requestId] : [])));
  const hits = [...history, ...audit]
    .filter((l) => mentions(l) || ((l.kind === 'outcome' || l.kind === 'call') && requests.has(l.requestId)))
    .sort((a, b) => a.t - b.t);
  return hits.slice(-16).map((l) => JSON.stringify(l));
}
