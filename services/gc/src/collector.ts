import type { Stats } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  audit,
  cancelled,
  classifyVolumeEntry,
  ConfinedRoot,
  DOMAIN_LEASE,
  DomainLeases,
  findGarbage,
  leaseOffset,
  GrpcStatus,
  ioError,
  isLeaseHeldByAnother,
  notFound,
  parseFenceName,
  pb,
  readDomainMetadata,
  readVolumeRecord,
  Reason,
  SdmeshError,
  validateDomainPath,
  type DomainRef,
  type EventPublisher,
  type GarbageClock,
  type GarbageItem,
  type Logger,
  type SkippedEntries,
} from '@sdmesh/common';
import { GcFaultInjector } from './faults';
import { ITEM_KINDS, Skip, type GcLeaseProvider, type ItemContext, type SkipReason } from './items';
import { readDirOrGone } from './items/core';
import type { GcMetrics } from './metrics';

export type { GcLeaseProvider } from './items';

export interface GarbageCollectorOptions {
  leases: GcLeaseProvider;
  /** Name of this host, recorded in each pass. */
  hostName: string;
  /** Items younger than this are left for a later pass (ms). */
  graceMs: number;
  /** A batch under the domain metadata lease ends after this many items or this long, whichever comes first. */
  batchMaxItems?: number;
  batchMaxMs?: number;
  /**
   * The bounds of a batch whose domain lease shows that nobody else took it since this pass's
   * previous batch (lver = the previous + 1): nobody else on any host wanted it in the pause,
   * so fewer, longer holds (defaults 1000 ms / 8000 items; never below the plain bounds).
   */
  soloBatchMaxItems?: number;
  soloBatchMaxMs?: number;
  /** How long an operation fence is kept before a pass removes it (default DEFAULT_FENCE_RETENTION_MS, a day; metadata-tx's rule). */
  fenceRetentionMs?: number;
  /** Pause between batches, so that transactions waiting for the domain lease get it. */
  batchPauseMs?: number;
  /**
   * Independent items removed at once (default 32): their file system calls and volume leases
   * overlap, and the volume leases they ask for at once are taken up to 8 per sanlock command.
   */
  parallelItems?: number;
  /** BACKLOG_HIGH event when a domain's backlog is above this for backlogPasses collected passes in a row. */
  backlogThreshold?: number;
  backlogPasses?: number;
  faults?: GcFaultInjector;
  events?: Pick<EventPublisher, 'publish'>;
  metrics?: GcMetrics;
  log?: Logger;
  now?: () => number;
  /** Called after each domain-lease batch (tests and the bench look at the bounds chosen). */
  onBatch?: (batch: BatchRecord) => void;
}

/** One hold of the domain metadata lease by a pass. */
export interface BatchRecord {
  domainId: string;
  /** sanlock's lease version of this hold (0: the provider has none). */
  lver: number;
  /** Nobody else held the lease since the previous batch of this pass: the longer bounds applied. */
  solo: boolean;
  /** Items started in the batch. */
  items: number;
  /** When the batch's work began and ended (its fsyncs included; the release follows). */
  startedAt: number;
  endedAt: number;
}

interface Planned {
  item: GarbageItem;
  ageMs: number;
  /** Set once the item is handled in this pass. */
  done?: 'removed' | 'skipped';
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * The file system state of one batch of removals: the directories it changed (fsynced once
 * each at the batch's end) and the listings it read (one per directory per batch).
 */
class BatchFiles {
  private dirty = new Set<string>();
  private listings = new Map<string, Promise<string[]>>();

  constructor(readonly dom: ConfinedRoot) {}

  changed(dir: string): void {
    this.dirty.add(dir);
  }

  list(dir: string): Promise<string[]> {
    let names = this.listings.get(dir);
    if (!names) {
      names = readDirOrGone(this.dom, dir);
      this.listings.set(dir, names);
      names.catch(() => this.listings.delete(dir));
    }
    return names;
  }

  /** fsyncs every changed directory, at once; returns the errors. */
  async flush(): Promise<string[]> {
    const dirs = [...this.dirty];
    this.dirty = new Set();
    this.listings = new Map();
    const errors: string[] = [];
    await Promise.all(
      dirs.map((dir) =>
        this.dom.fsyncDir(dir).catch((err: unknown) => {
          // A directory removed in the batch has nothing left to sync.
          if (SdmeshError.from(err).code !== GrpcStatus.NOT_FOUND) errors.push(`fsync ${this.dom.relative(dir)}: ${SdmeshError.from(err).message}`);
        }),
      ),
    );
    return errors;
  }
}

/** Allocated bytes of a file, or of the regular files directly inside a directory (image dirs are flat). */
export async function allocatedBytes(dom: ConfinedRoot, p: string): Promise<number> {
  const st = await dom.lstat(p).catch(() => undefined);
  if (!st) return 0;
  if (st.isFile()) return st.blocks * 512;
  if (!st.isDirectory()) return 0;
  let sum = 0;
  for (const name of await dom.listNames(p, ['file']).catch(() => [] as string[])) {
    const s = await dom.lstat(path.join(p, name)).catch(() => undefined);
    if (s?.isFile()) sum += s.blocks * 512;
  }
  return sum;
}

/**
 * The garbage collector of one host: a pass over one domain removes what findGarbage()
 * lists (docs/gc.md). Only the holder of the domain's GC lease collects. Transaction leftovers
 * are removed only while holding the domain metadata lease (so none of them can belong to a
 * live transaction), in short batches; a record that claims a lease slot is removed last, and
 * a deleted volume's record only while holding that volume's lease. Every step is idempotent:
 * a half-removed item is still garbage by name, so a rerun finishes it.
 */
export class GarbageCollector {
  private readonly faults: GcFaultInjector;
  private readonly now: () => number;
  private readonly highBacklogPasses = new Map<string, number>();

  constructor(private readonly opts: GarbageCollectorOptions) {
    this.faults = opts.faults ?? new GcFaultInjector();
    this.now = opts.now ?? Date.now;
  }

  /** Resolves a domain path to its id (NOT_FOUND DOMAIN_NOT_FOUND if it is not a domain). */
  async openDomain(domainPath: string): Promise<DomainRef> {
    const root = validateDomainPath(domainPath);
    try {
      const md = await readDomainMetadata(root);
      return { id: md.domainId, path: root };
    } catch (err) {
      const e = ioError(err, `domain ${root}`);
      if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`${root} is not a storage domain (no dom_md/metadata)`, Reason.DOMAIN_NOT_FOUND);
      throw e;
    }
  }

  /** What is garbage now: an operation fence only once expired (the rule metadata-tx removes them by). */
  private garbageClock(): GarbageClock {
    return { nowMs: this.now(), fenceRetentionMs: this.opts.fenceRetentionMs };
  }

  private ageOf(item: GarbageItem, mtimeMs: number | undefined): number {
    const since = item.deletedMs ?? item.tx?.startMs ?? item.fencedMs ?? mtimeMs ?? this.now();
    return Math.max(0, Math.round(this.now() - since));
  }

  // -------------------------------------------------------------------------------------
  // Dry run

  /** What a pass would remove now, with the reason it would skip an item. Takes no lease. */
  async list(domainPath: string): Promise<pb.GarbageItem[]> {
    const domain = await this.openDomain(domainPath);
    const dom = new ConfinedRoot(domain.path);
    const items = await findGarbage(domain.path, undefined, this.garbageClock());
    const owners = async (resource: string, slot: number): Promise<number[]> =>
      (await this.opts.leases.leaseOwners?.(domain, resource, slot).catch(() => undefined)) ?? [];
    const sdmOwners = items.some((i) => i.needsDomainLease) ? await owners(DOMAIN_LEASE.resource, DOMAIN_LEASE.slot) : [];
    const out: pb.GarbageItem[] = [];
    for (const item of items) {
      const full = path.join(domain.path, item.relativePath);
      const st = await dom.lstat(full).catch(() => undefined);
      if (!st) continue; // removed meanwhile
      const ageMs = this.ageOf(item, st.mtimeMs);
      let skipReason = '';
      if (ageMs < this.opts.graceMs) {
        skipReason = `younger than the grace period (${this.opts.graceMs - ageMs} ms left)`;
      } else if (item.needsDomainLease && sdmOwners.length > 0) {
        skipReason = `the domain metadata lease is held by host ${sdmOwners.join(', ')} now: its transaction may be in flight (a pass checks it again under that lease)`;
      } else if (item.kind === 'deleted-volume-meta' || item.kind === 'deleted-image') {
        skipReason = await this.recordsBlocking(domain, item, owners);
      }
      out.push(
        pb.GarbageItem.fromPartial({
          domainId: domain.id,
          relativePath: item.relativePath,
          kind: item.kind,
          bytes: await allocatedBytes(dom, full),
          mtime: new Date(st.mtimeMs),
          skipReason,
          imageId: item.imageId ?? '',
          volumeId: item.volumeId ?? '',
          txid: item.txid ?? '',
          txHostId: item.tx?.hostId ?? 0,
          ageMs,
        }),
      );
    }
    return out;
  }

  /** For the dry run: why the records of a deleted item cannot be removed now ('' = they can). */
  private async recordsBlocking(domain: DomainRef, item: GarbageItem, owners: (resource: string, slot: number) => Promise<number[]>): Promise<string> {
    const full = path.join(domain.path, item.relativePath);
    const dom = new ConfinedRoot(domain.path);
    const files =
      item.kind === 'deleted-volume-meta'
        ? [full]
        : (await dom.listNames(full, ['file']).catch(() => [] as string[]))
            .filter((n) => {
              const k = classifyVolumeEntry(n).kind;
              return k === 'meta' || k === 'deleted-meta';
            })
            .map((n) => path.join(full, n));
    for (const file of files) {
      let record;
      try {
        record = await readVolumeRecord(file, undefined, dom);
      } catch (err) {
        return `record ${path.relative(domain.path, file)} is unreadable (${SdmeshError.from(err).message}): its lease slot is unknown, so it is left for an operator`;
      }
      const held = await owners(record.volumeId, record.leaseSlot);
      if (held.length > 0) return `the lease of volume ${record.volumeId} is held by host ${held.join(', ')} (a job may still use it)`;
    }
    return '';
  }

  // -------------------------------------------------------------------------------------
  // A pass

  /**
   * One pass over a domain. Returns collected=false (not an error) when another host holds
   * the domain's GC lease. Errors of single items are reported in the pass, not thrown.
   */
  async collect(domainPath: string, signal?: AbortSignal): Promise<pb.GcPass> {
    const started = this.now();
    const pass = pb.GcPass.fromPartial({ domainPath, host: this.opts.hostName, startTime: new Date(started), collected: false });
    let domain: DomainRef;
    try {
      domain = await this.openDomain(domainPath);
    } catch (err) {
      pass.errors.push(SdmeshError.from(err).message);
      return this.finish(pass, 'error', started);
    }
    pass.domainId = domain.id;
    pass.domainPath = domain.path;
    const operationId = `gc-${this.opts.hostName}-${started}-${randomBytes(3).toString('hex')}`;
    // When this pass worked under the GC lease (logged, so tests can check passes never overlap).
    const held = { from: 0, to: 0 };
    try {
      await this.opts.leases.withGcLease(
        domain,
        operationId,
        async () => {
          held.from = this.now();
          try {
            await this.runPass(domain, pass, operationId, signal);
          } finally {
            held.to = this.now();
          }
        },
        signal,
      );
      pass.collected = true;
    } catch (err) {
      if (isLeaseHeldByAnother(err)) {
        pass.notCollectedReason = `another host collects this domain: ${SdmeshError.from(err).message}`;
        return this.finish(pass, 'not_holder', started);
      }
      // A domain deactivated or removed (or this host in maintenance): its lockspace is not joined again for a pass.
      const e = SdmeshError.from(err);
      if (e.reason === Reason.LOCKSPACE_LEFT) {
        pass.notCollectedReason = `this host left the domain's lockspace on the scheduler's order: ${e.message}`;
        return this.finish(pass, 'not_holder', started);
      }
      pass.collected = pass.domainLeaseBatches > 0 || pass.itemsFound > 0;
      pass.errors.push(SdmeshError.from(err).message);
      return this.finish(pass, 'error', started, held);
    }
    return this.finish(pass, pass.errors.length ? 'error' : 'collected', started, held);
  }

  private finish(pass: pb.GcPass, result: 'collected' | 'not_holder' | 'error', started: number, held = { from: 0, to: 0 }): pb.GcPass {
    const ended = this.now();
    pass.endTime = new Date(ended);
    this.opts.metrics?.passes.inc({ result });
    if (!pass.collected) return pass;
    pass.backlog = pass.itemsFound - pass.itemsRemoved;
    this.opts.metrics?.passDuration.observe((ended - started) / 1000);
    this.opts.metrics?.backlog.set({ domain: pass.domainId }, pass.backlog);
    this.opts.events?.publish({
      $case: 'gc',
      gc: { kind: pb.GcEvent_Kind.KIND_PASS_FINISHED, domainId: pass.domainId, relativePath: '', itemKind: '', bytes: pass.bytesFreed, backlog: pass.backlog },
    });
    this.checkBacklog(pass);
    this.opts.log?.info(
      {
        domainId: pass.domainId,
        found: pass.itemsFound,
        removed: pass.itemsRemoved,
        skipped: pass.itemsSkipped,
        bytesFreed: pass.bytesFreed,
        batches: pass.domainLeaseBatches,
        errors: pass.errors.length,
        ms: ended - started,
        gcLeaseWorkFromMs: held.from,
        gcLeaseWorkToMs: held.to,
      },
      'gc pass finished',
    );
    return pass;
  }

  /** One BACKLOG_HIGH event when the backlog stays above the threshold for N passes in a row. */
  private checkBacklog(pass: pb.GcPass): void {
    const threshold = this.opts.backlogThreshold ?? 1000;
    const needed = this.opts.backlogPasses ?? 3;
    const count = pass.backlog > threshold ? (this.highBacklogPasses.get(pass.domainId) ?? 0) + 1 : 0;
    this.highBacklogPasses.set(pass.domainId, count);
    if (count === needed) {
      this.opts.log?.warn({ domainId: pass.domainId, backlog: pass.backlog, threshold, passes: needed }, 'gc backlog stays high');
      this.opts.events?.publish({
        $case: 'gc',
        gc: { kind: pb.GcEvent_Kind.KIND_BACKLOG_HIGH, domainId: pass.domainId, relativePath: '', itemKind: '', bytes: 0, backlog: pass.backlog },
      });
    }
  }

  private async runPass(domain: DomainRef, pass: pb.GcPass, operationId: string, signal?: AbortSignal): Promise<void> {
    const dom = new ConfinedRoot(domain.path);
    const skipped: SkippedEntries = [];
    const items = await findGarbage(domain.path, skipped, this.garbageClock());
    for (const s of skipped) {
      // A symlink, FIFO, device or misplaced directory: never followed or removed; said once per pass.
      const name = path.basename(s.name);
      if (/^(_deleted_|_tx_|metadata\.tx-)/.test(name) || parseFenceName(name) || classifyVolumeEntry(s.name).kind !== 'foreign') {
        pass.errors.push(`${s.reason}: not collected, left for an operator`);
        this.opts.log?.warn({ domain: domain.id, entry: s.name, type: s.type }, 'unexpected entry type under a garbage or volume name: not collected');
      }
    }
    pass.itemsFound = items.length;
    this.faults.hit('gc.pass.after-list');
    // Each item's age and existence, parallelItems lstats at a time (one after another they were a
    // serial phase of the pass: bench/gc-collect.ts, 10 000 items).
    const stats = new Array<Stats | undefined>(items.length);
    let nextStat = 0;
    await Promise.all(
      Array.from({ length: Math.min(items.length, Math.max(1, this.opts.parallelItems ?? 32)) }, async () => {
        for (let i = nextStat++; i < items.length; i = nextStat++)
          stats[i] = await dom.lstat(path.join(domain.path, items[i]!.relativePath)).catch(() => undefined);
      }),
    );
    const planned: Planned[] = items.map((item, i) => {
      const st = stats[i];
      const p: Planned = { item, ageMs: this.ageOf(item, st?.mtimeMs) };
      if (!st) this.skip(pass, p, 'gone', '');
      else if (p.ageMs < this.opts.graceMs) this.skip(pass, p, 'grace', '');
      return p;
    });
    const todo = planned.filter((p) => !p.done);

    // Phase 1, no domain lease: data of deleted volumes and images. Nothing refers to it and
    // no transaction renames it back; its records (the slot claims) stay until phase 2.
    const batch = new BatchFiles(dom);
    const ctx = this.itemContext(domain, pass, planned, operationId, batch, signal);
    const phase1 = todo.filter((p) => ITEM_KINDS[p.item.kind].withoutDomainLease);
    await this.runItems(phase1, { signal, more: () => true }, (p) => {
      const step = ITEM_KINDS[p.item.kind].withoutDomainLease!;
      return this.attempt(domain, pass, p, () => step.remove(ctx, p.item), step.final);
    });
    await this.flush(batch, pass);

    // Phase 2, short batches under the domain metadata lease: transaction leftovers (garbage
    // only now: no transaction is in flight) and every record, the slot claims, last. Items of
    // one rank run in parallel (each is its own files); a rank starts when the one before ended.
    const phase2 = todo.filter((p) => !p.done).sort((a, b) => ITEM_KINDS[a.item.kind].rank - ITEM_KINDS[b.item.kind].rank);
    const maxItems = this.opts.batchMaxItems ?? 2000;
    const maxMs = this.opts.batchMaxMs ?? 250;
    const soloMaxItems = Math.max(this.opts.soloBatchMaxItems ?? 8000, maxItems);
    const soloMaxMs = Math.max(this.opts.soloBatchMaxMs ?? 1000, maxMs);
    // The version of this pass's previous hold: the next one proves whether anyone came between.
    let previousLver = 0;
    let next = 0;
    while (next < phase2.length) {
      this.checkAborted(signal);
      if (pass.domainLeaseBatches > 0) await sleep(this.opts.batchPauseMs ?? 50);
      await this.opts.leases.withDomainLease(
        domain,
        operationId,
        async (lease) => {
          pass.domainLeaseBatches++;
          this.auditRemoval(domain);
          this.faults.hit('gc.batch.after-domain-lease');
          const batchStart = this.now();
          const lver = lease.lver ?? 0;
          // Another holder (a create on any host, waiting or not) in the pause: short again, so
          // one that keeps coming waits at most a short batch. Else a longer one, still bounded:
          // a transaction that starts waiting meanwhile waits at most soloMaxMs.
          const solo = DomainLeases.heldAloneSince(previousLver, lver);
          previousLver = lver;
          const [itemBound, msBound] = solo ? [soloMaxItems, soloMaxMs] : [maxItems, maxMs];
          const items = phase2.slice(next, next + itemBound);
          let started = 0;
          try {
            await this.runItems(items, { signal, more: () => started === 0 || this.now() - batchStart < msBound, started: () => started++ }, (p) =>
              this.attempt(domain, pass, p, () => ITEM_KINDS[p.item.kind].underDomainLease(ctx, p.item), true),
            );
          } finally {
            next += started;
            // Durable before the domain lease goes: a freed slot is free on disk before a create can take it.
            await this.flush(batch, pass);
            this.auditRemoval(domain);
            const record: BatchRecord = { domainId: domain.id, lver, solo, items: started, startedAt: batchStart, endedAt: this.now() };
            this.opts.log?.info(record, 'gc domain-lease batch');
            try {
              this.opts.onBatch?.(record);
            } catch {
              // an observer's failure is not the pass's
            }
          }
        },
        signal,
      );
    }
  }

  /** The chaos audit trail (when on): this process removes garbage now, which it may only do under the domain metadata lease. */
  private auditRemoval(domain: DomainRef): void {
    audit({
      kind: 'write',
      phase: 'remove',
      host: this.opts.hostName,
      pid: process.pid,
      domain: domain.id,
      volume: DOMAIN_LEASE.resource,
      generation: -1,
      leaseOffset: leaseOffset(DOMAIN_LEASE.slot),
    });
  }

  /**
   * Runs fn over items, parallelItems at a time, in order of rank (one rank at a time), while
   * more() says so; every started item has ended when it returns or throws.
   */
  private async runItems(
    items: Planned[],
    opts: { signal?: AbortSignal; more: () => boolean; started?: () => void },
    fn: (p: Planned) => Promise<void>,
  ): Promise<void> {
    const limit = Math.max(1, this.opts.parallelItems ?? 32);
    const running = new Set<Promise<void>>();
    let rank = -1;
    try {
      for (const p of items) {
        if (!opts.more()) break;
        this.checkAborted(opts.signal);
        opts.started?.();
        if (p.done) continue;
        const itemRank = ITEM_KINDS[p.item.kind].rank;
        if (itemRank !== rank) {
          await Promise.all(running);
          rank = itemRank;
        }
        while (running.size >= limit) await Promise.race(running);
        if (p.done) continue; // removed alongside another meanwhile
        const task: Promise<void> = fn(p).finally(() => running.delete(task));
        running.add(task);
      }
      await Promise.all(running);
    } finally {
      await Promise.allSettled(running);
    }
  }

  /** fsyncs the directories a batch changed (once each); a failure is the pass's error. */
  private async flush(batch: BatchFiles, pass: pb.GcPass): Promise<void> {
    for (const err of await batch.flush()) pass.errors.push(err);
  }

  /** What the item kinds' removals use in this pass. */
  private itemContext(domain: DomainRef, pass: pb.GcPass, planned: Planned[], operationId: string, batch: BatchFiles, signal?: AbortSignal): ItemContext {
    const byPath = new Map(planned.map((p) => [p.item.relativePath, p]));
    return {
      domain,
      dom: batch.dom,
      leases: this.opts.leases,
      faults: this.faults,
      operationId,
      signal,
      syncDir: (dir) => batch.changed(dir),
      listOnce: (dir) => batch.list(dir),
      removedAlongside: (relativePath, bytes) => {
        const other = byPath.get(relativePath);
        if (!other || other.done) return false;
        pass.bytesFreed += bytes;
        this.opts.metrics?.bytesFreed.inc(bytes);
        this.removed(domain, pass, other, bytes);
        return true;
      },
    };
  }

  private checkAborted(signal?: AbortSignal): void {
    if (signal?.aborted) throw signal.reason instanceof SdmeshError ? signal.reason : cancelled('gc pass cancelled', Reason.CANCELLED);
  }

  /** Runs one removal step; a Skip or an error leaves the item for a later pass. */
  private async attempt(domain: DomainRef, pass: pb.GcPass, p: Planned, step: () => Promise<number>, final: boolean): Promise<void> {
    try {
      const bytes = await step();
      pass.bytesFreed += bytes;
      this.opts.metrics?.bytesFreed.inc(bytes);
      if (final) this.removed(domain, pass, p, bytes);
    } catch (err) {
      if (err instanceof Skip) {
        this.skip(pass, p, err.reason, err.message);
        return;
      }
      const e = SdmeshError.from(err);
      if (e.code === GrpcStatus.CANCELLED || e.code === GrpcStatus.DEADLINE_EXCEEDED) throw e;
      this.skip(pass, p, 'error', `${p.item.relativePath}: ${e.message}`);
    }
  }

  private removed(domain: DomainRef, pass: pb.GcPass, p: Planned, bytes: number): void {
    p.done = 'removed';
    pass.itemsRemoved++;
    this.opts.metrics?.itemsRemoved.inc({ kind: p.item.kind });
    this.opts.events?.publish({
      $case: 'gc',
      gc: { kind: pb.GcEvent_Kind.KIND_ITEM_REMOVED, domainId: domain.id, relativePath: p.item.relativePath, itemKind: p.item.kind, bytes, backlog: 0 },
    });
    this.opts.log?.info({ domainId: domain.id, path: p.item.relativePath, kind: p.item.kind, txid: p.item.txid, bytes }, 'garbage removed');
  }

  private skip(pass: pb.GcPass, p: Planned, reason: SkipReason, message: string): void {
    p.done = 'skipped';
    pass.itemsSkipped++;
    this.opts.metrics?.itemsSkipped.inc({ reason });
    if (reason === 'error') {
      pass.errors.push(message);
      this.opts.log?.warn({ path: p.item.relativePath, kind: p.item.kind, err: message }, 'garbage item not removed');
    } else if (message) {
      this.opts.log?.info({ path: p.item.relativePath, kind: p.item.kind, reason, detail: message }, 'garbage item skipped');
    }
  }
}
