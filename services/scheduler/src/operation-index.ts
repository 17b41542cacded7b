import type { Logger, pb } from '@sdmesh/common';
import { sleep } from './cluster';
import type { KvChange, KvWatch } from './kv-store';
import type { SchedulerMetrics } from './metrics';
import { decodeOperation, idOfKey, isTerminal, OPERATION_KEY_PREFIX, type OperationRecord, type OperationStore } from './operation-store';

/** What a replica keeps in memory of every operation: enough to filter, sort, page and purge without reading KV. */
export interface OperationSummary {
  id: string;
  /** KV revision of the record this summary was made from (compare-and-set on it). */
  revision: number;
  type: pb.OperationType;
  status: pb.OperationStatus;
  requestId: string;
  targetResources: string[];
  createMs: number;
  /** Time of the last write: for an ended operation, when it ended. */
  updateMs: number;
  /** Set on a tombstone (see OperationRecord.purgedMs). */
  purgedMs?: number;
  owner: string;
  ownerBeatMs: number;
}

/** A change of one operation: its new record, or undefined once it is gone from KV. */
export type OperationListener = (rec: OperationRecord | undefined, revision: number) => void;

export interface OperationIndexOptions {
  store: OperationStore;
  log: Logger;
  metrics?: SchedulerMetrics;
  /** Pause before watching again after the KV watch ended on its own (NATS gone for good). */
  rewatchMs?: number;
}

/** Ended and not yet purged: the record a watcher or waiter must see. */
const endedVisibly = (rec: OperationRecord) => isTerminal(rec.op.status) && rec.purgedMs === undefined;

function summaryOf(rec: OperationRecord, revision: number): OperationSummary {
  return {
    id: rec.id,
    revision,
    type: rec.op.type,
    status: rec.op.status,
    requestId: rec.op.requestId,
    targetResources: rec.op.targetResources,
    createMs: rec.op.createTime?.getTime() ?? 0,
    updateMs: rec.op.updateTime?.getTime() ?? 0,
    purgedMs: rec.purgedMs,
    owner: rec.owner,
    ownerBeatMs: rec.ownerBeatMs,
  };
}

/**
 * Every operation of the bucket, followed by one KV watch per replica: the records are read
 * once at start, then kept current from the watch's changes (each write of any replica arrives
 * here in revision order). Lists, filters and retention work on this in-memory summary instead
 * of re-reading KV; WatchOperation/WaitOperation subscribe to one operation's changes here, so
 * any number of watching clients cost one server-side watch.
 */
export class OperationIndex {
  private entries = new Map<string, OperationSummary>();
  private readonly listeners = new Map<string, Set<OperationListener>>();
  private watch?: KvWatch;
  private stopped = false;
  /** The highest revision applied (from the read or the watch). */
  private seenRevision = 0;
  /** Waiters for seenRevision to reach a revision. */
  private catchUp: Array<{ revision: number; resolve: () => void }> = [];
  private markReady!: () => void;
  /** Resolves once the first full read is in (lists wait for it). */
  readonly ready = new Promise<void>((r) => (this.markReady = r));
  private readonly stopSignal = new AbortController();
  private stopOwnWrites?: () => void;

  constructor(private readonly opts: OperationIndexOptions) {}

  start(): void {
    // This replica's own writes show here at once (read-your-writes for its lists and watchers).
    this.stopOwnWrites = this.opts.store.onWrite((rec, revision) => this.put(rec.id, rec, revision));
    void this.follow();
  }

  stop(): void {
    this.stopped = true;
    this.stopOwnWrites?.();
    this.stopSignal.abort();
    this.watch?.stop();
  }

  /** Watch and read everything (load), then follow the watch; again if it ends. */
  private async follow(): Promise<void> {
    while (!this.stopped) {
      try {
        const watch = await this.load();
        this.markReady();
        await watch.ended;
        if (!this.stopped) this.opts.log.warn('operations KV watch ended; watching again');
      } catch (err) {
        if (!this.stopped) this.opts.log.warn({ err: String(err) }, 'operations KV watch failed; retrying');
      }
      this.watch?.stop();
      await sleep(this.opts.rewatchMs ?? 1000, this.stopSignal.signal).catch(() => undefined);
    }
  }

  /**
   * Opens the watch, then reads every record. The watch's changes are applied as they come, also
   * while the read runs: the read can take long (a listing of the bucket under writes has taken
   * more than a minute on a loaded machine) and subscribers must not wait for it. A record the
   * read returns is kept unless the watch brought a newer change of it (a delete included);
   * whatever changed while no watch ran reaches its subscribers. Its own function so the full
   * read is garbage once it returns.
   */
  private async load(): Promise<KvWatch> {
    const changedWhileReading = new Map<string, number>();
    let reading = true;
    this.watch = await this.opts.store.kv.watch(OPERATION_KEY_PREFIX, (c) => {
      if (reading) changedWhileReading.set(idOfKey(c.key), c.revision);
      this.apply(c);
    });
    const loaded = await this.opts.store.listWithRevisions();
    reading = false;
    const listed = new Set<string>();
    for (const { rec, revision } of loaded) {
      listed.add(rec.id);
      if ((changedWhileReading.get(rec.id) ?? 0) < revision) this.put(rec.id, rec, revision);
    }
    this.saw(loaded.reduce((max, l) => Math.max(max, l.revision), 0));
    // Known here but not listed, and untouched by the watch: gone while no watch ran, or missed by the listing.
    for (const id of this.entries.keys()) if (!listed.has(id) && !changedWhileReading.has(id)) this.recheck(id);
    return this.watch;
  }

  /** Reads one operation from KV into the index (and to its subscribers): still there, or gone. */
  private recheck(id: string): void {
    const known = this.entries.get(id)?.revision;
    void this.opts.store.get(id).then(
      (cur) => {
        if (cur) this.put(id, cur.rec, cur.revision);
        else if (this.entries.get(id)?.revision === known) {
          this.entries.delete(id);
          this.notify(id, undefined, 0);
        }
      },
      () => undefined,
    );
  }

  private saw(revision: number): void {
    if (revision <= this.seenRevision) return;
    this.seenRevision = revision;
    this.catchUp = this.catchUp.filter((w) => (w.revision <= revision ? (w.resolve(), false) : true));
  }

  /** A change the watch delivered. */
  private apply(c: KvChange): void {
    this.saw(c.revision);
    const id = idOfKey(c.key);
    const cur = this.entries.get(id);
    if (cur && cur.revision >= c.revision) return;
    if (c.value === undefined) {
      this.entries.delete(id);
      this.notify(id, undefined, c.revision);
      return;
    }
    let rec: OperationRecord;
    try {
      rec = decodeOperation(c.value);
    } catch (err) {
      this.opts.log.warn({ key: c.key, err: String(err) }, 'unreadable operation record ignored');
      return;
    }
    this.put(id, rec, c.revision);
  }

  /**
   * A record at a revision (from the watch, this replica's own write or a KV read): kept unless
   * the index has that revision or a newer one. Does not move seenRevision: only the watch says
   * how far the bucket has been followed.
   */
  private put(id: string, rec: OperationRecord, revision: number): void {
    const cur = this.entries.get(id);
    if (cur && cur.revision >= revision) return;
    this.entries.set(id, summaryOf(rec, revision));
    this.notify(id, rec, revision);
  }

  private notify(id: string, rec: OperationRecord | undefined, revision: number): void {
    for (const l of this.listeners.get(id) ?? []) l(rec, revision);
  }

  /** Every summary (after the first full read). */
  async summaries(): Promise<OperationSummary[]> {
    await this.ready;
    return [...this.entries.values()];
  }

  /**
   * Every summary, including every write that completed before this call (read-your-writes for
   * a client that creates an operation and lists at once): waits, bounded, until the watch has
   * delivered the bucket's newest revision. One KV status request.
   */
  async currentSummaries(maxWaitMs = 2000): Promise<OperationSummary[]> {
    await this.ready;
    const target = await this.opts.store.kv.lastRevision().catch(() => 0);
    if (target > this.seenRevision) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        const waiter = { revision: target, resolve };
        this.catchUp.push(waiter);
        timer = setTimeout(() => {
          this.catchUp = this.catchUp.filter((w) => w !== waiter);
          resolve();
        }, maxWaitMs);
      });
      clearTimeout(timer);
    }
    return [...this.entries.values()];
  }

  /** Calls `listener` on every change of one operation until the returned function is called. */
  subscribe(id: string, listener: OperationListener): () => void {
    let set = this.listeners.get(id);
    if (!set) this.listeners.set(id, (set = new Set()));
    set.add(listener);
    this.opts.metrics?.operationWatchers.inc();
    let done = false;
    return () => {
      if (done) return;
      done = true;
      set.delete(listener);
      if (set.size === 0 && this.listeners.get(id) === set) this.listeners.delete(id);
      this.opts.metrics?.operationWatchers.dec();
    };
  }

  /** Subscriptions open now (what the watchers gauge shows). */
  subscriptionCount(): number {
    let n = 0;
    for (const s of this.listeners.values()) n += s.size;
    return n;
  }

  /**
   * One operation's record now, then each newer one, until the signal aborts (or the caller
   * stops iterating). Changes that arrive while the caller is busy are coalesced: the caller
   * gets the newest. Yields undefined once if the operation does not exist (or stops existing).
   * The subscription ends with the signal even if the caller never resumes the generator.
   */
  async *changes(id: string, signal: AbortSignal): AsyncGenerator<OperationRecord | undefined> {
    let pending: { rec: OperationRecord | undefined; revision: number } | undefined;
    let wake: (() => void) | undefined;
    const unsubscribe = this.subscribe(id, (rec, revision) => {
      if (pending && pending.revision >= revision && rec) return;
      // A burst (a watch catching up) is coalesced to its newest change, but how the operation
      // ended is never hidden behind what came after it (its purge, its delete): callers stop there.
      if (pending?.rec && endedVisibly(pending.rec)) return;
      pending = { rec, revision };
      wake?.();
    });
    const onAbort = () => {
      unsubscribe();
      wake?.();
    };
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      const cur = await this.opts.store.get(id);
      let lastRevision = cur?.revision ?? 0;
      if (!pending || pending.revision <= lastRevision) pending = undefined;
      yield cur?.rec;
      if (!cur) return;
      while (!signal.aborted) {
        if (!pending) {
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
          continue;
        }
        const next = pending;
        pending = undefined;
        if (next.rec && next.revision <= lastRevision) continue;
        lastRevision = next.revision;
        yield next.rec;
        if (!next.rec) return;
      }
    } finally {
      signal.removeEventListener('abort', onAbort);
      unsubscribe();
    }
  }
}
