/**
 * Group commit of metadata transactions: while this process holds a domain's metadata lease,
 * the transactions queued here for the same domain run under the same hold, one after the
 * other (each keeps its own marker, commit and result), instead of each paying a lease
 * acquire and release. The hold ends when the queue is empty (after a short linger for
 * transactions that are about to arrive) or when a bounded number of transactions or a bounded
 * time has passed; then, if work is still queued, this host waits a moment before taking the
 * lease again, so that other hosts waiting for it get their turn. Waiting hosts look at the lease
 * on storage (lease-look.ts) to learn of its release, and try it in turns (see untilWorthTrying).
 * The bounds are wider while nobody else wants the lease: when the lease's version (sanlock's lver, bumped by every
 * exclusive acquire) shows that no other holder took it in the gap this process left after its
 * last hold, the next hold may run longer (soloHoldMs, soloBatch); as soon as another holder
 * took a gap, holds are short again. The lver cannot tell such a holder that a host started
 * waiting during its hold: a waiter's refused try leaves a request in the lease area (sanlock's
 * request record, AcquireLease request_if_held), and a solo hold reads it at the end of each
 * normal batch (every maxBatch transactions or maxHoldMs; one small read, lease-look.ts
 * isDomainLeaseWanted): once it shows another host wants the lease, the hold ends there. So a
 * host that starts waiting waits for at most one normal batch of the holder, and a host that is
 * truly alone keeps the wider bounds. The request only ever ends a hold sooner: who holds the
 * lease is still sanlock's acquire alone.
 *
 * Pipelining: a transaction that names the things it creates (its keys: new image and volume
 * ids) may, once its serial part is done (its checks, its slot taken from the index), call
 * detach(); the hold then starts the next transaction while the detached one writes its own
 * files (marker, record, lease area, data, commit), which no other transaction reads. A transaction without keys starts only when nothing detached is
 * in flight, one with keys only when no detached transaction shares a key; the hold is released
 * only after every transaction in it has ended, so each still runs entirely under the lease.
 */
import { aborted as abortedError, DomainLeases, isLeaseHeldByAnother, SdmeshError } from '@sdmesh/common';
import { isDomainLeaseWanted, lookAtDomainLease, type LeaseLook } from './lease-look';
import type { DomainLeaseHold, DomainLeaseProvider, DomainRef } from './leases';

export interface GroupCommitOptions {
  /** Most transactions run in one hold (default 64). */
  maxBatch?: number;
  /** A hold takes no new transaction after this long, counted from the end of its first transaction's serial part (default 250 ms). */
  maxHoldMs?: number;
  /** How long an empty queue is waited on (once nothing of the hold is in flight) before the lease is released (default 5 ms). */
  lingerMs?: number;
  /**
   * The bounds of a hold that follows a hold of this process with no other holder in between
   * (lver = the last + 1; a provider without lver never gives one): defaults 1000 ms, 256.
   */
  soloHoldMs?: number;
  soloBatch?: number;
  /**
   * Asked in a solo hold at the end of each normal batch (maxBatch transactions or maxHoldMs):
   * whether another host wants the lease held at version lver (default: the request record in
   * the lease area, lease-look.ts isDomainLeaseWanted); true ends the hold there, false or no
   * answer (within LOOK_TIMEOUT_MS) lets it run on. false: never asked.
   */
  leaseWanted?: ((domain: DomainRef, lver: number) => Promise<boolean | undefined>) | false;
  /** Pause before taking the lease again after a hold ended by its bound with work queued (default 50 ms). */
  yieldMs?: number;
  /**
   * With a provider that can try the lease without waiting (tryDomainLease): the pause between
   * tries while another holds it, plus up to as much again at random (default 15 ms). The
   * lease-manager's own wait backs off to 1 s between tries and would rarely catch the gap
   * between another host's holds.
   */
  pollMs?: number;
  /**
   * How a waiting host learns that the lease was released (lease-look.ts: a direct read of the
   * lease's leader record on storage, default) without asking the lease-manager each time; false:
   * only the poll above. While looks succeed the poll above is stretched by watchedPollFactor
   * (default 8): it is then only the fallback for a release the looks did not show.
   */
  lookAtLease?: ((domain: DomainRef) => Promise<LeaseLook | undefined>) | false;
  /** The pause between looks while another holds the lease (default 4 ms). */
  lookMs?: number;
  watchedPollFactor?: number;
  /**
   * This host's id (sanlock host id; 0 = unknown: a random turn). Waiters that see the lease
   * released take turns to try it (turnMs apart, the order rotating with the lease version), so
   * that two hosts rarely run sanlock's acquire at the same moment: two ballots for one lease
   * collide, and sanlock then delays the loser (or both) by a random 0–1 s.
   */
  hostId?: number;
  /** Between two waiters' turns (default 6 ms: an acquire shows on storage well within it). */
  turnMs?: number;
  /** Longest wait for the lease when the transaction has no signal (default 120 s). */
  maxWaitMs?: number;
  /**
   * Awaited at the end of each hold, after its last transaction ended and before the lease is
   * released (metadata-tx writes the hold's slot journal entry there); its failure is ignored.
   */
  beforeRelease?: (domain: DomainRef, lease: DomainLeaseHold, serial: number) => Promise<void>;
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
  /** Whether the lease's version proved that nobody else held it since this process's last hold (wider bounds applied). */
  solo: boolean;
  /** A solo hold ended early because another host asked for the lease (its request record). */
  requested: boolean;
}

/** What a transaction learns of the hold it runs in. */
export interface GroupHold {
  /** The lease as acquired (its fencing token, if the provider gives one). */
  lease: DomainLeaseHold;
  /** Counts the holds of this domain by this process: equal for transactions of one hold. */
  serial: number;
  /** 0 for the first transaction of the hold. */
  position: number;
  /** Lets the hold start later transactions while this one finishes (only for a transaction with keys; see above). */
  detach(): void;
  /** Resolves when no other transaction of the hold is in flight. */
  settled(): Promise<void>;
}

interface Waiter {
  run: (hold: GroupHold) => Promise<void>;
  /** What it creates (may overlap with others that share none); undefined: runs alone. */
  keys?: readonly string[];
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
  /** The lver of this process's last hold of the domain (0: unknown). */
  lastLver: number;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** How many turns waiters that saw a release are spread over (hosts whose ids differ by a multiple of it share a turn). */
const TURNS = 4;
/** A look at the lease not answered within this long is no answer. */
const LOOK_TIMEOUT_MS = 100;

/** p's value, or undefined if it fails or takes longer than ms. */
function answerWithin<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(undefined), ms);
    const done = (value: T | undefined) => {
      clearTimeout(timer);
      resolve(value);
    };
    p.then(done, () => done(undefined));
  });
}

export class DomainLeaseGroups {
  private readonly queues = new Map<string, DomainQueue>();
  private readonly maxBatch: number;
  private readonly maxHoldMs: number;
  private readonly soloBatch: number;
  private readonly soloHoldMs: number;
  private readonly lingerMs: number;
  private readonly yieldMs: number;
  private readonly pollMs: number;
  private readonly maxWaitMs: number;
  private readonly look?: (domain: DomainRef) => Promise<LeaseLook | undefined>;
  private readonly lookMs: number;
  private readonly watchedPollFactor: number;
  private readonly turnMs: number;
  private readonly wanted?: (domain: DomainRef, lver: number) => Promise<boolean | undefined>;

  constructor(
    private readonly leases: DomainLeaseProvider,
    private readonly opts: GroupCommitOptions = {},
  ) {
    this.maxBatch = opts.maxBatch ?? 64;
    this.maxHoldMs = opts.maxHoldMs ?? 250;
    this.soloBatch = Math.max(opts.soloBatch ?? 256, this.maxBatch);
    this.soloHoldMs = Math.max(opts.soloHoldMs ?? 1000, this.maxHoldMs);
    this.lingerMs = opts.lingerMs ?? 5;
    this.yieldMs = opts.yieldMs ?? 50;
    this.pollMs = opts.pollMs ?? 15;
    this.maxWaitMs = opts.maxWaitMs ?? 120_000;
    const look = opts.lookAtLease === false ? undefined : (opts.lookAtLease ?? lookAtDomainLease);
    // A look that hangs (storage stalled) counts as no answer: the waiter falls back to polling.
    this.look = look && ((domain) => answerWithin(look(domain), LOOK_TIMEOUT_MS));
    this.lookMs = opts.lookMs ?? 4;
    this.watchedPollFactor = opts.watchedPollFactor ?? 8;
    this.turnMs = opts.turnMs ?? 6;
    const wanted = opts.leaseWanted === false ? undefined : (opts.leaseWanted ?? isDomainLeaseWanted);
    this.wanted = wanted && ((domain, lver) => answerWithin(wanted(domain, lver), LOOK_TIMEOUT_MS));
  }

  /**
   * Runs fn under the domain's metadata lease, in the current hold of this process if there is
   * one, else in the next. Waiting can be abandoned through signal (the transaction then never
   * runs). fn's result or error is its own: a failed transaction does not end the hold.
   */
  run<T>(domain: DomainRef, operationId: string, fn: (hold: GroupHold) => Promise<T>, signal?: AbortSignal, keys?: readonly string[]): Promise<T> {
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
        keys,
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
    if (!queue) this.queues.set(domainId, (queue = { waiters: [], active: false, serial: 0, lastLver: 0 }));
    return queue;
  }

  /** One hold: runs queued transactions until the queue stays empty or a bound is reached, then waits for the detached ones. */
  private async hold(domain: DomainRef, queue: DomainQueue, lease: DomainLeaseHold): Promise<HoldRecord['ended']> {
    const acquiredAt = Date.now();
    const serial = ++queue.serial;
    const lver = lease.lver ?? 0;
    const solo = DomainLeases.heldAloneSince(queue.lastLver, lver);
    queue.lastLver = lver;
    const maxBatch = solo ? this.soloBatch : this.maxBatch;
    const maxHoldMs = solo ? this.soloHoldMs : this.maxHoldMs;
    const inFlight = new Set<{ keys?: readonly string[]; done: Promise<void> }>();
    const settledExcept = async (self: object) => {
      for (let others = [...inFlight].filter((f) => f !== self); others.length; others = [...inFlight].filter((f) => f !== self)) {
        await Promise.all(others.map((f) => f.done));
      }
    };
    let position = 0;
    // The time bound counts from the end of the first transaction's serial part: that part may
    // rebuild the slot index (a scan of the domain, after another host's hold), and a hold that
    // spent its time on it would serve one create per lease round trip.
    let boundFrom = acquiredAt;
    // A solo hold runs in normal batches; at the end of each it asks whether another host wants the lease.
    const batch = { from: acquiredAt, position: 0 };
    let requested = false;
    let ended: HoldRecord['ended'] = 'drained';
    try {
      while (position < maxBatch && Date.now() - boundFrom < maxHoldMs) {
        // While some are in flight, the hold waits for new work until they end (their callers
        // may send more as soon as they have their answers); then for lingerMs more.
        while (!queue.waiters.length && inFlight.size) await this.arrival(queue, Promise.race([...inFlight].map((f) => f.done)));
        if (!queue.waiters.length) await this.arrival(queue, sleep(this.lingerMs));
        if (solo && this.wanted && queue.waiters.length && (position - batch.position >= this.maxBatch || Date.now() - batch.from >= this.maxHoldMs)) {
          if ((requested = (await this.wanted(domain, lver)) === true)) break;
          batch.position = position;
          batch.from = Date.now();
        }
        const next = queue.waiters.shift();
        if (!next) return ended;
        // Alone, or beside detached transactions that share none of its keys.
        const conflicts = () => [...inFlight].filter((f) => !next.keys || !f.keys || f.keys.some((k) => next.keys!.includes(k)));
        for (let c = conflicts(); c.length; c = conflicts()) await Promise.all(c.map((f) => f.done));
        let detached!: () => void;
        const detachedOrDone = new Promise<void>((resolve) => (detached = resolve));
        const entry: { keys?: readonly string[]; done: Promise<void> } = { keys: next.keys, done: Promise.resolve() };
        entry.done = next
          .run({
            lease,
            serial,
            position: position++,
            detach: () => {
              if (next.keys) detached();
            },
            settled: () => settledExcept(entry),
          })
          .finally(() => {
            inFlight.delete(entry);
            detached();
          });
        inFlight.add(entry);
        await detachedOrDone;
        if (position === 1) boundFrom = batch.from = Date.now();
      }
      return (ended = 'bound');
    } finally {
      while (inFlight.size) await Promise.all([...inFlight].map((f) => f.done));
      await this.opts.beforeRelease?.(domain, lease, serial).catch(() => undefined);
      try {
        this.opts.onHold?.({ domainId: domain.id, acquiredAt, releasedAt: Date.now(), transactions: position, ended, solo, requested });
      } catch {
        // an observer's failure is not the transactions'
      }
    }
  }

  /** Resolves when a transaction arrives or `until` resolves, whichever is first. */
  private async arrival(queue: DomainQueue, until: Promise<unknown>): Promise<void> {
    await Promise.race([until, new Promise<void>((resolve) => (queue.wake = resolve))]);
    queue.wake = undefined;
  }

  /** Takes the lease (waiting at most as long as the first waiter may) and runs a hold. */
  private async acquireAndHold(domain: DomainRef, queue: DomainQueue, operationId: string, first: Waiter): Promise<HoldRecord['ended']> {
    const hold = (lease: DomainLeaseHold) => this.hold(domain, queue, lease);
    if (!this.leases.tryDomainLease) return this.leases.withDomainLease(domain, operationId, hold, first.signal);
    const giveUpAt = Date.now() + this.maxWaitMs;
    const tried: { freeLver?: number } = {};
    for (;;) {
      try {
        return await this.leases.tryDomainLease(domain, operationId, hold, first.signal);
      } catch (err) {
        // Held for longer than a caller without a deadline waits: the last refusal is the answer.
        if (!isLeaseHeldByAnother(err) || (!first.signal && Date.now() > giveUpAt)) throw err;
      }
      // The first gave up (its signal rejected it): serve() goes on with the others.
      const wanted = () => queue.waiters.includes(first);
      await this.untilWorthTrying(domain, wanted, tried);
      if (!wanted()) return 'drained';
    }
  }

  /**
   * Waits, after the lease was refused, until trying again is worth it: the looks at the lease
   * show it released and it is this host's turn, or the poll's time is up. Without looks (or when
   * one fails) it is the plain poll.
   */
  private async untilWorthTrying(domain: DomainRef, wanted: () => boolean, tried: { freeLver?: number }): Promise<void> {
    const started = Date.now();
    const pollMs = this.pollMs * (1 + Math.random());
    const fallbackAt = started + pollMs * this.watchedPollFactor;
    const plainPoll = () => sleep(Math.max(0, started + pollMs - Date.now()));
    while (wanted()) {
      const seen = await this.look?.(domain);
      if (!seen) return plainPoll();
      if (seen.free) {
        // Refused while it looked free at this very version (e.g. held by another process of
        // this host, which the lease-manager knows before storage shows it): the plain poll.
        if (tried.freeLver === seen.lver) return plainPoll();
        const turn = this.turnAfter(seen.lver);
        if (turn > 0) {
          await sleep(turn * this.turnMs);
          const again = await this.look?.(domain);
          // Taken in an earlier turn: watch the new holder. Still free (or not readable): try.
          if (again && !again.free) continue;
        }
        tried.freeLver = seen.lver;
        return;
      }
      if (Date.now() >= fallbackAt) return;
      await sleep(this.lookMs);
    }
  }

  /** This host's turn (0 first) among waiters that saw the lease free at version lver. */
  private turnAfter(lver: number): number {
    const hostId = this.opts.hostId ?? 0;
    if (hostId <= 0) return Math.floor(Math.random() * TURNS);
    return (((hostId - lver) % TURNS) + TURNS) % TURNS;
  }

  /** Takes the lease for as long as transactions are queued, in bounded holds. */
  private async serve(domain: DomainRef, queue: DomainQueue, operationId: string): Promise<void> {
    try {
      while (queue.waiters.length) {
        const first = queue.waiters[0]!;
        let ended: HoldRecord['ended'] = 'drained';
        try {
          ended = await this.acquireAndHold(domain, queue, operationId, first);
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
