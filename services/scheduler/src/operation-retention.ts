import type { Logger } from '@sdmesh/common';
import { KvConflict } from './kv-store';
import type { SchedulerMetrics } from './metrics';
import type { OperationIndex, OperationSummary } from './operation-index';
import { isTerminal, type OperationStore } from './operation-store';

export interface RetentionOptions {
  index: OperationIndex;
  store: OperationStore;
  log: Logger;
  metrics: SchedulerMetrics;
  /** An ended operation stays whole (GetOperation, its result, a request_id retry answered with it) this long after it ended. */
  operationRetentionMs: number;
  /** Its tombstone stays this long after the end (≥ operationRetentionMs): a request_id retry is refused, not run again. */
  requestIdRetentionMs: number;
  now?: () => number;
}

/**
 * Purges ended operations in two stages (from the in-memory index: no KV scan):
 *   1. `operationRetentionMs` after its end, the record becomes a tombstone (what it was, how it
 *      ended, its request fingerprint): GetOperation → NOT_FOUND OPERATION_PURGED; the same
 *      request_id → FAILED_PRECONDITION REQUEST_ID_EXPIRED, never a second run;
 *   2. `requestIdRetentionMs` after its end, the tombstone is deleted: the request_id is free.
 * Every write is a compare-and-set on the revision the index saw, and only ended operations
 * are touched, so any number of replicas can sweep at once: one wins, the others see a conflict.
 */
export class OperationRetention {
  private timer?: NodeJS.Timeout;
  private busy = false;
  private readonly now: () => number;

  constructor(private readonly opts: RetentionOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Sweeps every quarter of the retention (at most each minute, at least each quarter second). */
  start(): void {
    const every = Math.min(60_000, Math.max(250, Math.floor(this.opts.operationRetentionMs / 4)));
    this.timer = setInterval(() => void this.sweep(), every);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** One pass; returns how many records were purged at each stage. */
  async sweep(): Promise<{ records: number; requestIds: number }> {
    const counted = { records: 0, requestIds: 0 };
    if (this.busy) return counted;
    this.busy = true;
    try {
      const now = this.now();
      for (const s of await this.opts.index.summaries()) {
        if (!isTerminal(s.status)) continue;
        const endedMs = now - s.updateMs;
        if (s.purgedMs === undefined && endedMs >= this.opts.operationRetentionMs) {
          if (await this.attempt(s, () => this.opts.store.tombstone(s.id, s.revision, now))) counted.records++;
        } else if (s.purgedMs !== undefined && endedMs >= this.opts.requestIdRetentionMs) {
          if (await this.attempt(s, async () => (await this.opts.store.deleteAt(s.id, s.revision), true))) counted.requestIds++;
        }
      }
    } catch (err) {
      this.opts.log.warn({ err: String(err) }, 'operation retention sweep failed');
    } finally {
      this.busy = false;
    }
    if (counted.records) this.opts.metrics.operationsPurged.inc({ stage: 'record' }, counted.records);
    if (counted.requestIds) this.opts.metrics.operationsPurged.inc({ stage: 'request_id' }, counted.requestIds);
    if (counted.records || counted.requestIds) this.opts.log.info(counted, 'purged ended operations');
    return counted;
  }

  /** A purge write; false when another replica (or a late write) changed the record first. */
  private async attempt(s: OperationSummary, write: () => Promise<boolean>): Promise<boolean> {
    try {
      return await write();
    } catch (err) {
      if (err instanceof KvConflict) return false;
      this.opts.log.warn({ operation: s.id, err: String(err) }, 'could not purge an operation');
      return false;
    }
  }
}
