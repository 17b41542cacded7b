/**
 * Group commit of metadata transactions: while this process holds a domain's metadata lease,
 * the transactions queued here for the same domain run under the same hold, one after the
 * other (each keeps its own marker, commit and result), instead of each paying a lease
 * acquire and release. The hold ends when the queue is empty (after a short linger for
 * transactions that are about to arrive) or when a bounded number of transactions or a bounded
 * time has passed; then, if work is still queued, this host waits a moment before taking the
 * lease again, so that other hosts polling for it get their turn.
 */
import { aborted as abortedError, SdmeshError } from '@sdmesh/common';
import type { DomainLeaseHold, DomainLeaseProvider, DomainRef } from './leases';

export interface GroupCommitOptions {
  /** Most transactions run in one hold (default 64). */
  maxBatch?: number;
  /** A hold takes no new transaction after this long (default 250 ms). */
  maxHoldMs?: number;
  /** How long an empty queue is waited on before the lease is released (default 2 ms). */
  lingerMs?: number;
  /** Pause before taking the lease again after a hold ended by its bound with work queued (default 25 ms). */
  yieldMs?: number;
  /** Called with each hold when it ends (tests and benches check that hosts' holds never overlap). */
  onHold?: (hold: HoldRecord) => void;
}

/** One hold of a domain lease by this process: wall-clock times (ms since the epoch). */
export interface HoldRecord {
  domainId: string;
  acquiredAt: number;
  releasedAt: number;
  transactions: number;
  /** Why it ended: the queue drained, or the batch/time bound. */
  ended: 'drained' | 'bound';
}

/** What a transaction learns of the hold it runs in. */
export interface GroupHold {
  /** The lease as acquired (its fencing token, if the provider gives one). */
  lease: DomainLeaseHold;
  /** Counts the holds of this domain by this process: equal for transactions of one hold. */
  serial: number;
  /** 0 for the first transaction of the hold. */
  position: number;
}

interface Waiter {
  run: (hold: GroupHold) => Promise<void>;
  /** Ends a waiter that will not run (the lease could not be taken). */
  fail: (err: unknown) => void;
  signal?: AbortSignal;
}

interface DomainQueue {
  waiters: Waiter[];
  /** Set while a holder loop (acquiring, holding or yielding) serves this domain. */
  active: boolean;
  /** Wakes a lingering hold when a transaction arrives. */
  wake?: () => void;
  serial: number;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class DomainLeaseGroups {
  private readonly queues = new Map<string, DomainQueue>();
  private readonly maxBatch: number;
  private readonly maxHoldMs: number;
  private readonly lingerMs: number;
  private readonly yieldMs: number;

  constructor(
    private readonly leases: DomainLeaseProvider,
    private readonly opts: GroupCommitOptions = {},
  ) {
    this.maxBatch = opts.maxBatch ?? 64;
    this.maxHoldMs = opts.maxHoldMs ?? 250;
    this.lingerMs = opts.lingerMs ?? 2;
    this.yieldMs = opts.yieldMs ?? 25;
  }

  /**
   * Runs fn under the domain's metadata lease, in the current hold of this process if there is
   * one, else in the next. Waiting can be abandoned through signal (the transaction then never
   * runs). fn's result or error is its own: a failed transaction does not end the hold.
   */
  run<T>(domain: DomainRef, operationId: string, fn: (hold: GroupHold) => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(SdmeshError.from(signal.reason ?? abortedError('cancelled while waiting for the domain lease')));
    return new Promise<T>((resolve, reject) => {
      const queue = this.queueOf(domain.id);
      const onAbort = () => {
        const i = queue.waiters.indexOf(waiter);
        if (i < 0) return; // already running: the transaction sees the signal itself
        queue.waiters.splice(i, 1);
        reject(SdmeshError.from(signal?.reason ?? abortedError('cancelled while waiting for the domain lease')));
      };
      const waiter: Waiter = {
        signal,
        fail: (err) => {
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
        run: async (hold) => {
          signal?.removeEventListener('abort', onAbort);
          try {
            resolve(await fn(hold));
          } catch (err) {
            reject(err);
          }
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      queue.waiters.push(waiter);
      queue.wake?.();
      if (!queue.active) {
        queue.active = true;
        void this.serve(domain, queue, operationId);
      }
    });
  }

  private queueOf(domainId: string): DomainQueue {
    let queue = this.queues.get(domainId);
    if (!queue) this.queues.set(domainId, (queue = { waiters: [], active: false, serial: 0 }));
    return queue;
  }

  /** One hold: runs queued transactions one at a time until the queue stays empty or a bound is reached. */
  private async hold(domain: DomainRef, queue: DomainQueue, lease: DomainLeaseHold): Promise<HoldRecord['ended']> {
    const acquiredAt = Date.now();
    const serial = ++queue.serial;
    let position = 0;
    let ended: HoldRecord['ended'] = 'drained';
    try {
      while (position < this.maxBatch && Date.now() - acquiredAt < this.maxHoldMs) {
        const next = queue.waiters.shift() ?? (await this.linger(queue));
        if (!next) return ended;
        await next.run({ lease, serial, position: position++ });
      }
      return (ended = 'bound');
    } finally {
      try {
        this.opts.onHold?.({ domainId: domain.id, acquiredAt, releasedAt: Date.now(), transactions: position, ended });
      } catch {
        // an observer's failure is not the transactions'
      }
    }
  }

  /** Waits up to lingerMs for a transaction to arrive. */
  private async linger(queue: DomainQueue): Promise<Waiter | undefined> {
    if (this.lingerMs <= 0) return undefined;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.lingerMs);
      queue.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    queue.wake = undefined;
    return queue.waiters.shift();
  }

  /** Takes the lease for as long as transactions are queued, in bounded holds. */
  private async serve(domain: DomainRef, queue: DomainQueue, operationId: string): Promise<void> {
    try {
      while (queue.waiters.length) {
        const first = queue.waiters[0]!;
        let ended: HoldRecord['ended'] = 'drained';
        try {
          ended = await this.leases.withDomainLease(domain, operationId, (lease) => this.hold(domain, queue, lease), first.signal);
        } catch (err) {
          // The lease was not obtained: the first waiter, whose signal bounded the wait, gets the error.
          const i = queue.waiters.indexOf(first);
          if (i >= 0) {
            queue.waiters.splice(i, 1);
            first.fail(err);
          }
        }
        if (ended === 'bound' && queue.waiters.length) await sleep(this.yieldMs);
      }
    } finally {
      queue.active = false;
    }
  }
}
