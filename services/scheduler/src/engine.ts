import { createHash } from 'node:crypto';
import {
  aborted,
  alreadyExists,
  cancelled,
  failedPrecondition,
  GrpcStatus,
  notFound,
  pb,
  Reason,
  SdmeshError,
  type EventPublisher,
  type Logger,
} from '@sdmesh/common';
import { operationIdFor, operationName, requestIdOf } from './ids';
import { KvConflict } from './kv-store';
import { LockConflict, type LockManager, type LockRequest } from './locks';
import type { SchedulerMetrics } from './metrics';
import { ProgressThrottle } from './progress-throttle';
import { isTerminal, LostOwnership, type OperationRecord, type OperationStore } from './operation-store';

/** Why a running flow was stopped without ending its operation: another replica resumes it. */
export class Shutdown extends Error {
  constructor() {
    super('scheduler shutting down');
  }
}

export const CANCELLED_REASON = Reason.OPERATION_CANCELLED;

export type OperationResult = pb.Operation['result'];

/** One run of one step. */
export interface StepRun {
  /** 1 for the first run, more after a retry or a resume. */
  attempt: number;
  /** Records the host the step runs on (shown in the operation), and the try number when a step retries inside one run. */
  setHost(host: string, attempt?: number): Promise<void>;
  /**
   * Step progress and, optionally, the operation's overall progress; without it the operation
   * shows the bytes of all its data steps (progressOfSteps). Persisted and published at most
   * once a second, the newest value winning (see progress-throttle.ts).
   */
  progress(step: pb.Progress, overall?: pb.Progress): Promise<void>;
}

export interface FlowContext<P = unknown> {
  readonly id: string;
  readonly name: string;
  readonly rec: OperationRecord<P>;
  readonly signal: AbortSignal;
  readonly log: Logger;
  /** Runs a step once: a step that completed (in this or an earlier run) returns its stored result. */
  step<T>(name: string, fn: (run: StepRun) => Promise<T>): Promise<T>;
  /** Whether a request of this name was made to the operation (Engine.request, from any replica): read fresh from KV. */
  requested(what: string): Promise<boolean>;
  /** Per-flow bookkeeping that must survive a restart (job ids, hosts, attempts). */
  scratch<T>(key: string): T | undefined;
  saveScratch(key: string, value: unknown): Promise<void>;
}

/**
 * The steps of one operation type. Method syntax on purpose: the engine holds every flow as
 * Flow<unknown> and hands each the record its own prepare wrote (operations/index.ts pairs them).
 */
export interface Flow<P = unknown> {
  run(ctx: FlowContext<P>): Promise<OperationResult>;
  /** Undoes a failed or cancelled run (e.g. deletes a half-made target); steps named "rollback:...". */
  rollback?(ctx: FlowContext<P>, error: SdmeshError): Promise<void>;
}

export interface Submission<P = unknown> {
  type: pb.OperationType;
  requestId: string;
  /** The request without its request_id: what "the same request" means. */
  request: unknown;
  waitForLocks: boolean;
  /** Validates the request (throws on bad input, nothing changed) and says what it locks. */
  prepare(operationId: string): Promise<{ params: P; locks: LockRequest[]; targetResources: string[] }>;
}

export interface EngineOptions {
  store: OperationStore;
  locks: LockManager;
  flows: Map<pb.OperationType, Flow>;
  log: Logger;
  events: EventPublisher;
  metrics: SchedulerMetrics;
  instanceId: string;
  /** How often an owner refreshes its claim on its running operations. */
  beatMs: number;
  /** An operation whose owner has not refreshed for this long is taken over. */
  takeoverMs: number;
  /**
   * Status, owner and beat of every operation, without reading KV (the operation index); the
   * resume scan reads the whole bucket each beat without it.
   */
  ownerViews?: () => Promise<OperationOwnerView[]>;
}

/** What the resume scan needs to know of an operation to pick it as a candidate. */
export interface OperationOwnerView {
  id: string;
  status: pb.OperationStatus;
  owner: string;
  ownerBeatMs: number;
}

const ownerViewOf = (rec: OperationRecord): OperationOwnerView => ({ id: rec.id, status: rec.op.status, owner: rec.owner, ownerBeatMs: rec.ownerBeatMs });

const typeName = (t: pb.OperationType) => pb.operationTypeToJSON(t).replace('OPERATION_TYPE_', '');
const statusName = (s: pb.OperationStatus) => pb.operationStatusToJSON(s).replace('OPERATION_STATUS_', '');

const errorStatus = (e: SdmeshError): pb.ErrorStatus => ({ code: e.code, message: e.message, reason: e.reason });

/**
 * Runs operations as persisted step machines. The record in KV is the truth: whoever owns
 * it (and keeps its heartbeat fresh) runs it; a replica that sees a stale owner takes it over
 * and resumes it, skipping the steps already done.
 */
export class Engine {
  private readonly running = new Map<string, { controller: AbortController; done: Promise<void> }>();
  /** Operations submit() has stored but not launched yet: not stale, whatever a resume scan sees. */
  private readonly submitting = new Set<string>();
  private timers: NodeJS.Timeout[] = [];
  private stopping = false;
  private resumeBusy = false;

  constructor(private readonly opts: EngineOptions) {}

  get instanceId(): string {
    return this.opts.instanceId;
  }

  start(): void {
    this.timers.push(setInterval(() => void this.beat(), this.opts.beatMs));
    this.timers.push(setInterval(() => void this.resumeStale(), this.opts.beatMs));
    void this.resumeStale();
  }

  /** Stops running flows without ending their operations: they are resumed by a replica. */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    for (const r of this.running.values()) r.controller.abort(new Shutdown());
    await Promise.all([...this.running.values()].map((r) => r.done));
  }

  runningCount(): number {
    return this.running.size;
  }

  /** Creates the operation of a request (or returns the existing one) and starts it. */
  async submit<P>(s: Submission<P>): Promise<pb.Operation> {
    const requestId = requestIdOf(s.requestId);
    const id = operationIdFor(requestId);
    const fingerprint = createHash('sha256')
      .update(JSON.stringify({ type: s.type, request: s.request }))
      .digest('hex');
    const existing = await this.opts.store.get(id);
    if (existing) return this.sameRequest(existing.rec, fingerprint, requestId);

    const prepared = await s.prepare(id);
    const now = new Date();
    const rec: OperationRecord<P> = {
      id,
      op: pb.Operation.fromPartial({
        name: operationName(id),
        requestId,
        type: s.type,
        status: pb.OperationStatus.OPERATION_STATUS_PENDING,
        progress: { percent: 0 },
        createTime: now,
        updateTime: now,
        targetResources: prepared.targetResources,
        owner: this.opts.instanceId,
      }),
      fingerprint,
      params: prepared.params,
      locks: prepared.locks,
      waitForLocks: s.waitForLocks,
      locksHeld: false,
      owner: this.opts.instanceId,
      ownerBeatMs: Date.now(),
      cancelRequested: false,
      state: {},
    };
    // A concurrent submit of the same request may hold the mark already: only its holder clears it.
    const marked = !this.submitting.has(id);
    this.submitting.add(id);
    try {
      return await this.storeAndLaunch(rec, s.waitForLocks, fingerprint, requestId);
    } finally {
      if (marked) this.submitting.delete(id);
    }
  }

  private async storeAndLaunch(rec: OperationRecord, waitForLocks: boolean, fingerprint: string, requestId: string): Promise<pb.Operation> {
    const id = rec.id;
    try {
      await this.opts.store.create(rec);
    } catch (err) {
      if (!(err instanceof KvConflict)) throw err;
      const raced = await this.opts.store.get(id);
      if (raced) return this.sameRequest(raced.rec, fingerprint, requestId);
      throw aborted('the operation was created and removed concurrently; retry', Reason.CONCURRENT_REQUEST);
    }
    if (!waitForLocks) {
      try {
        await this.opts.locks.acquireAll(id, rec.locks);
      } catch (err) {
        await this.opts.store.delete(id).catch(() => undefined);
        if (err instanceof LockConflict) throw await this.lockedError(err);
        throw err;
      }
      rec.locksHeld = true;
      await this.update(id, (r) => (r.locksHeld = true));
    }
    this.publish(rec.op, '', undefined);
    this.launch(rec);
    return rec.op;
  }

  private sameRequest(rec: OperationRecord, fingerprint: string, requestId: string): pb.Operation {
    if (rec.fingerprint !== fingerprint) {
      throw alreadyExists(`request_id ${requestId} was already used for a different request (${rec.op.name})`, Reason.REQUEST_ID_REUSED);
    }
    // Its result is gone: running the request again could repeat a destructive change the caller already saw done.
    if (rec.purgedMs !== undefined)
      throw failedPrecondition(
        `request_id ${requestId} belongs to ${ended(rec)}; its record was purged, so this retry is not run again: use a new request_id to run the request again`,
        Reason.REQUEST_ID_EXPIRED,
      );
    return rec.op;
  }

  private async lockedError(c: LockConflict): Promise<SdmeshError> {
    const blocker = await this.opts.store.get(c.blocker).catch(() => undefined);
    const what = blocker ? ` (${typeName(blocker.rec.op.type)}, ${statusName(blocker.rec.op.status)})` : '';
    return aborted(`${c.entity} is locked by ${operationName(c.blocker)}${what}; retry later or set wait_for_locks`, Reason.LOCKED);
  }

  async get(id: string): Promise<pb.Operation> {
    return (await this.record(id)).op;
  }

  /** The record of an operation that exists and was not purged. */
  private async record(id: string): Promise<OperationRecord> {
    const cur = await this.opts.store.get(id);
    return visibleRecord(id, cur?.rec);
  }

  async cancel(id: string): Promise<pb.Operation> {
    const cur = { rec: await this.record(id) };
    if (isTerminal(cur.rec.op.status)) return cur.rec.op;
    const rec = await this.opts.store.update(id, (r) => {
      if (isTerminal(r.op.status)) return;
      r.cancelRequested = true;
      r.op.status = pb.OperationStatus.OPERATION_STATUS_ABORTING;
    });
    this.publish(rec.op, rec.op.currentStep, undefined);
    this.running.get(id)?.controller.abort(cancelled(`${operationName(id)} was cancelled`, CANCELLED_REASON));
    return rec.op;
  }

  /**
   * Records a request to a running operation's flow (from any replica, like a cancel): `check`
   * sees the fresh record and throws to refuse it (e.g. not running, wrong type). Idempotent.
   */
  async request(id: string, what: string, check: (rec: OperationRecord) => void): Promise<pb.Operation> {
    check(await this.record(id));
    const rec = await this.opts.store.update(id, (r) => {
      check(r);
      (r.requests ??= {})[what] ??= Date.now();
    });
    // An event names the request (e.g. a transfer's finalize) as its step, like a cancel's ABORTING.
    this.publish(rec.op, what, undefined);
    return rec.op;
  }

  /** CAS update of a record this replica owns. */
  private update(id: string, mutate: (r: OperationRecord) => void): Promise<OperationRecord> {
    return this.opts.store.update(id, (r) => {
      if (r.owner !== this.opts.instanceId) throw new LostOwnership(id, r.owner);
      mutate(r);
    });
  }

  private publish(op: pb.Operation, step: string, host: string | undefined): void {
    this.opts.events.publish({
      $case: 'operation',
      operation: { operationName: op.name, status: op.status, step, progress: op.progress, error: op.error, host: host ?? '' },
    });
    if (!isTerminal(op.status)) this.opts.metrics.lastProgress.set({ operation: op.name, type: typeName(op.type) }, Date.now() / 1000);
  }

  private async beat(): Promise<void> {
    for (const [id, r] of this.running) {
      try {
        const rec = await this.update(id, (x) => (x.ownerBeatMs = Date.now()));
        if (rec.cancelRequested) r.controller.abort(cancelled(`${operationName(id)} was cancelled`, CANCELLED_REASON));
      } catch (err) {
        if (err instanceof LostOwnership) r.controller.abort(err);
        else this.opts.log.warn({ operation: id, err: String(err) }, 'operation heartbeat failed');
      }
    }
  }

  /**
   * Takes over operations whose owner stopped heartbeating (a dead or restarted replica). The
   * candidates come from the operation index when there is one (status, owner and beat are in
   * memory: a pass costs no KV read while nothing is stale, however many operations ended);
   * each candidate is read fresh and claimed by compare-and-set on that fresh record.
   */
  async resumeStale(): Promise<void> {
    if (this.resumeBusy || this.stopping) return;
    this.resumeBusy = true;
    try {
      const candidates = this.opts.ownerViews ? await this.opts.ownerViews() : (await this.opts.store.list()).map(ownerViewOf);
      for (const seen of candidates) {
        if (!this.looksStale(seen)) continue;
        // The candidate may be older than the record (an index behind its watch, a scan's copy): decide on the record.
        const cur = await this.opts.store.get(seen.id);
        if (!cur || !this.looksStale(ownerViewOf(cur.rec))) continue;
        const seenBeat = cur.rec.ownerBeatMs;
        const seenOwner = cur.rec.owner;
        try {
          const claimed = await this.opts.store.update(seen.id, (r) => {
            // The record may have changed since it was read: an operation that has ended since, or
            // that this replica launched meanwhile, is not stale.
            if (r.ownerBeatMs !== seenBeat || r.owner !== seenOwner || isTerminal(r.op.status)) throw new LostOwnership(r.id, r.owner);
            if (this.running.has(r.id) || this.submitting.has(r.id)) throw new LostOwnership(r.id, r.owner);
            r.owner = this.opts.instanceId;
            r.ownerBeatMs = Date.now();
            r.op.owner = this.opts.instanceId;
          });
          this.opts.log.info({ operation: cur.rec.op.name, previousOwner: seenOwner, step: cur.rec.op.currentStep }, 'resuming operation');
          this.launch(claimed);
        } catch (err) {
          if (!(err instanceof LostOwnership)) this.opts.log.warn({ err: String(err), operation: seen.id }, 'could not claim operation');
        }
      }
    } catch (err) {
      this.opts.log.warn({ err: String(err) }, 'resume scan failed');
    } finally {
      this.resumeBusy = false;
    }
  }

  /** Unfinished, not run here, and its owner's beat is old (or it names this replica, which does not run it: a restart). */
  private looksStale(v: OperationOwnerView): boolean {
    if (isTerminal(v.status) || this.running.has(v.id) || this.submitting.has(v.id)) return false;
    return v.owner === this.opts.instanceId || Date.now() - v.ownerBeatMs >= this.opts.takeoverMs;
  }

  private launch(rec: OperationRecord): void {
    const controller = new AbortController();
    if (rec.cancelRequested) controller.abort(cancelled(`${rec.op.name} was cancelled`, CANCELLED_REASON));
    const entry = { controller, done: Promise.resolve() };
    this.running.set(rec.id, entry);
    this.opts.metrics.running.set(this.running.size);
    entry.done = this.execute(rec, controller.signal)
      .catch((err: unknown) => this.opts.log.error({ err: String(err), operation: rec.id }, 'operation runner crashed'))
      .finally(() => {
        this.running.delete(rec.id);
        this.opts.metrics.running.set(this.running.size);
      });
  }

  private async execute(initial: OperationRecord, signal: AbortSignal): Promise<void> {
    const id = initial.id;
    let rec = initial;
    const flow = this.opts.flows.get(rec.op.type);
    try {
      if (!rec.locksHeld) {
        this.opts.metrics.queueDepth.inc();
        let waitedMs: number;
        try {
          if (rec.waitForLocks) {
            waitedMs = await this.opts.locks.acquireAllWaiting(id, rec.locks, signal);
          } else {
            // Resumed before its locks were taken: take them now or fail.
            const t = Date.now();
            await this.opts.locks.acquireAll(id, rec.locks);
            waitedMs = Date.now() - t;
          }
        } finally {
          this.opts.metrics.queueDepth.dec();
        }
        this.opts.metrics.lockWait.observe(waitedMs / 1000);
        rec = await this.update(id, (r) => (r.locksHeld = true));
      }
      if (rec.op.status === pb.OperationStatus.OPERATION_STATUS_PENDING) {
        rec = await this.update(id, (r) => (r.op.status = pb.OperationStatus.OPERATION_STATUS_RUNNING));
        this.publish(rec.op, '', undefined);
      }
      if (!flow) throw new SdmeshError(GrpcStatus.UNIMPLEMENTED, `no flow for ${typeName(rec.op.type)}`, Reason.UNIMPLEMENTED);

      const ctx = this.context(rec, signal);
      let result: OperationResult;
      let failure = rec.state.failure as pb.ErrorStatus | undefined;
      if (!failure) {
        try {
          if (signal.aborted) throw signal.reason;
          result = await flow.run(ctx);
        } catch (err) {
          if (err instanceof Shutdown || err instanceof LostOwnership) throw err;
          const e = SdmeshError.from(err);
          failure = errorStatus(e);
          await this.update(id, (r) => {
            r.state.failure = failure;
            if (e.reason === CANCELLED_REASON) r.op.status = pb.OperationStatus.OPERATION_STATUS_ABORTING;
          });
          this.opts.log.warn({ operation: rec.op.name, code: GrpcStatus[e.code], reason: e.reason, err: e.message }, 'operation failed; rolling back');
        }
      }
      if (failure) {
        const e = new SdmeshError(failure.code, failure.message, failure.reason);
        let rollbackError: SdmeshError | undefined;
        try {
          // Rollback runs even when the operation was cancelled: with a fresh signal.
          await flow.rollback?.(this.context(ctx.rec, this.shutdownOnly(signal)), e);
        } catch (err) {
          if (err instanceof Shutdown || err instanceof LostOwnership) throw err;
          rollbackError = SdmeshError.from(err);
        }
        const status = e.reason === CANCELLED_REASON ? pb.OperationStatus.OPERATION_STATUS_ABORTED : pb.OperationStatus.OPERATION_STATUS_FAILED;
        const error = rollbackError
          ? { ...failure, message: `${failure.message}; rollback incomplete: ${rollbackError.message}`, reason: failure.reason }
          : failure;
        await this.finish(id, status, error, undefined);
      } else {
        await this.finish(id, pb.OperationStatus.OPERATION_STATUS_DONE, undefined, result);
      }
    } catch (err) {
      if (err instanceof Shutdown || (signal.aborted && signal.reason instanceof Shutdown)) {
        this.opts.log.info({ operation: id }, 'left for another replica (shutdown)');
        // Its progress series belongs to the next owner now; a frozen copy here would look stuck.
        this.opts.metrics.lastProgress.remove({ operation: rec.op.name, type: typeName(rec.op.type) });
        return;
      }
      if (err instanceof LostOwnership) {
        this.opts.log.warn({ operation: id, err: err.message }, 'lost ownership; stopped running it');
        this.opts.metrics.lastProgress.remove({ operation: rec.op.name, type: typeName(rec.op.type) });
        return;
      }
      // Locks not obtained (no wait), or the runner itself failed: end it cleanly.
      const e = err instanceof LockConflict ? await this.lockedError(err) : SdmeshError.from(err);
      const status = e.reason === CANCELLED_REASON ? pb.OperationStatus.OPERATION_STATUS_ABORTED : pb.OperationStatus.OPERATION_STATUS_FAILED;
      await this.finish(id, status, errorStatus(e), undefined).catch((e2: unknown) =>
        this.opts.log.error({ operation: id, err: String(e2) }, 'could not record the failure'),
      );
    }
  }

  /** A signal that aborts only on shutdown or lost ownership, not on cancel (for rollbacks). */
  private shutdownOnly(signal: AbortSignal): AbortSignal {
    const c = new AbortController();
    const check = () => {
      if (signal.reason instanceof Shutdown || signal.reason instanceof LostOwnership) c.abort(signal.reason);
    };
    if (signal.aborted) check();
    else signal.addEventListener('abort', check, { once: true });
    // Stop/ownership loss after the cancel still has to reach the rollback.
    const poll = setInterval(() => {
      if (this.stopping) c.abort(new Shutdown());
    }, 200);
    c.signal.addEventListener('abort', () => clearInterval(poll), { once: true });
    poll.unref();
    return c.signal;
  }

  private async finish(id: string, status: pb.OperationStatus, error: pb.ErrorStatus | undefined, result: OperationResult): Promise<void> {
    const rec = await this.update(id, (r) => {
      r.op.status = status;
      r.op.error = error;
      r.op.result = result;
      r.op.currentStep = '';
      r.op.owner = '';
      if (status === pb.OperationStatus.OPERATION_STATUS_DONE) r.op.progress = { ...(r.op.progress ?? pb.Progress.fromPartial({})), percent: 100 };
    });
    if (rec.locksHeld) await this.opts.locks.releaseAll(id, rec.locks);
    const type = typeName(rec.op.type);
    const outcome = statusName(status).toLowerCase();
    this.opts.metrics.operations.inc({ type, outcome });
    this.opts.metrics.duration.observe({ type }, (Date.now() - (rec.op.createTime?.getTime() ?? Date.now())) / 1000);
    this.opts.metrics.lastProgress.remove({ operation: rec.op.name, type });
    this.publish(rec.op, '', undefined);
    this.opts.log.info({ operation: rec.op.name, type, status: outcome, reason: error?.reason }, 'operation ended');
  }

  private context(initial: OperationRecord, signal: AbortSignal): FlowContext {
    const live = new LiveRecord(initial, {
      update: (id, mutate) => this.update(id, mutate),
      publish: (op, step, host) => this.publish(op, step, host),
    });
    return {
      id: initial.id,
      name: initial.op.name,
      get rec() {
        return live.rec;
      },
      signal,
      log: this.opts.log.child({ operation: initial.op.name }),
      scratch: <T>(key: string): T | undefined => ((live.rec.state.scratch ?? {}) as Record<string, T>)[key],
      saveScratch: (key: string, value: unknown) =>
        live.update((r) => {
          const s = (r.state.scratch ??= {}) as Record<string, unknown>;
          s[key] = value;
        }),
      step: <T>(name: string, fn: (run: StepRun) => Promise<T>) => runStep(live, signal, name, fn),
      requested: async (what: string) => (await this.opts.store.get(initial.id))?.rec.requests?.[what] !== undefined,
    };
  }
}

/** "operations/<id> (MOVE_DISK), which ended DONE at <time>". */
const ended = (rec: OperationRecord) =>
  `${rec.op.name} (${typeName(rec.op.type)}), which ended ${statusName(rec.op.status)} at ${rec.op.updateTime?.toISOString() ?? 'an unknown time'}`;

/** The record as the API may show it: NOT_FOUND when it does not exist or was purged. */
export function visibleRecord(id: string, rec: OperationRecord | undefined): OperationRecord {
  if (!rec) throw notFound(`${operationName(id)} does not exist`, Reason.OPERATION_NOT_FOUND);
  if (rec.purgedMs !== undefined)
    throw notFound(`${ended(rec)}, was purged at ${new Date(rec.purgedMs).toISOString()} (operation retention)`, Reason.OPERATION_PURGED);
  return rec;
}

/** What a flow context needs from the engine: writes to a record it owns, and operation events. */
interface RecordWriter {
  update(id: string, mutate: (r: OperationRecord) => void): Promise<OperationRecord>;
  publish(op: pb.Operation, step: string, host: string | undefined): void;
}

/** The newest copy of a running operation's record; every write goes through the engine (CAS, ownership). */
class LiveRecord {
  constructor(
    public rec: OperationRecord,
    private readonly writer: RecordWriter,
  ) {}

  private writes: Promise<unknown> = Promise.resolve();

  /** One write at a time, in call order, so `rec` is always the newest (a progress write may run beside a step's own). */
  update(mutate: (r: OperationRecord) => void): Promise<void> {
    const write = this.writes
      .catch(() => undefined)
      .then(() => this.writer.update(this.rec.id, mutate))
      .then((rec) => void (this.rec = rec));
    this.writes = write;
    return write;
  }

  publish(step: string, host: string | undefined): void {
    this.writer.publish(this.rec.op, step, host);
  }
}

/** Changes one step of the record, found by name (a record without it is left as it is). */
function withStep(r: OperationRecord, name: string, change: (s: pb.OperationStep) => void): void {
  const s = r.op.steps.find((x) => x.name === name);
  if (s) change(s);
}

/** The results of the steps done so far, by step name. */
const stepResults = (rec: OperationRecord) => (rec.state.results ??= {}) as Record<string, unknown>;

/** Runs a step once: a step done before (in this run or an earlier one) returns its stored result. */
async function runStep<T>(live: LiveRecord, signal: AbortSignal, name: string, fn: (run: StepRun) => Promise<T>): Promise<T> {
  if (name in stepResults(live.rec)) return stepResults(live.rec)[name] as T;
  if (signal.aborted) throw signal.reason;
  const attempt = await beginStep(live, name);
  const reporter = stepReporter(live, name, attempt);
  try {
    const value = await fn(reporter.run);
    await reporter.close();
    await completeStep(live, name, value);
    live.publish(name, reporter.host());
    return value;
  } catch (caught) {
    // A step interrupted by an abort ends for the abort's reason (cancel, shutdown, lost
    // ownership), not for the error of the call the abort broke off.
    const err: unknown = signal.aborted ? signal.reason : caught;
    await reporter.close();
    if (!(err instanceof Shutdown) && !(err instanceof LostOwnership) && !(signal.reason instanceof Shutdown)) {
      await recordStepFailure(live, name, SdmeshError.from(err));
    }
    throw err;
  }
}

/** Marks the step running (adding it on its first run) and returns its attempt number. */
async function beginStep(live: LiveRecord, name: string): Promise<number> {
  let attempt = 1;
  await live.update((r) => {
    let s = r.op.steps.find((x) => x.name === name);
    if (!s) {
      s = pb.OperationStep.fromPartial({ name, attempt: 0, startTime: new Date() });
      r.op.steps.push(s);
    }
    s.attempt += 1;
    attempt = s.attempt;
    s.status = pb.OperationStatus.OPERATION_STATUS_RUNNING;
    s.error = undefined;
    r.op.currentStep = name;
  });
  live.publish(name, undefined);
  return attempt;
}

/** The StepRun handed to a step, and the host it reported (its later events name that host). */
function stepReporter(live: LiveRecord, name: string, attempt: number): { run: StepRun; host: () => string; close: () => Promise<void> } {
  let host = '';
  // Progress comes often; the record (a KV write each) and the events get at most one a second, the newest.
  const progress = new ProgressThrottle<{ step: pb.Progress; overall?: pb.Progress }>(
    async ({ step, overall }) => {
      await live.update((r) => {
        withStep(r, name, (s) => (s.progress = step));
        r.op.progress = overall ?? progressOfSteps(r.op.steps);
      });
      live.publish(name, host);
    },
    () => undefined,
  );
  const run: StepRun = {
    attempt,
    async setHost(h: string, tryNumber?: number) {
      host = h;
      await live.update((r) =>
        withStep(r, name, (s) => {
          s.host = h;
          if (tryNumber !== undefined) s.attempt = Math.max(s.attempt, tryNumber);
        }),
      );
      live.publish(name, h);
    },
    progress: (step: pb.Progress, overall?: pb.Progress) => progress.offer({ step, overall }),
  };
  return { run, host: () => host, close: () => progress.close() };
}

/**
 * An operation's progress when its flow does not compute one: the bytes of its data steps so
 * far (each step that reported a byte total), with the MB/s of the one running.
 */
export function progressOfSteps(steps: pb.OperationStep[]): pb.Progress {
  let done = 0;
  let total = 0;
  let mbps = 0;
  for (const s of steps) {
    if (!s.progress || s.progress.bytesTotal <= 0) continue;
    total += s.progress.bytesTotal;
    done += s.status === pb.OperationStatus.OPERATION_STATUS_DONE ? s.progress.bytesTotal : s.progress.bytesDone;
    if (s.status === pb.OperationStatus.OPERATION_STATUS_RUNNING) mbps = s.progress.mbps;
  }
  return { percent: total ? (done / total) * 100 : 0, bytesDone: done, bytesTotal: total, mbps };
}

/** Stores the step's result (so a resumed run skips it) and marks it done. */
async function completeStep(live: LiveRecord, name: string, value: unknown): Promise<void> {
  await live.update((r) => {
    stepResults(r)[name] = value ?? null;
    withStep(r, name, (s) => {
      s.status = pb.OperationStatus.OPERATION_STATUS_DONE;
      s.endTime = new Date();
      if (s.progress) s.progress.percent = 100;
    });
  });
}

/** Marks the step failed or aborted; best effort, the step's error is what the caller sees. */
async function recordStepFailure(live: LiveRecord, name: string, e: SdmeshError): Promise<void> {
  await live
    .update((r) =>
      withStep(r, name, (s) => {
        s.status = e.reason === CANCELLED_REASON ? pb.OperationStatus.OPERATION_STATUS_ABORTED : pb.OperationStatus.OPERATION_STATUS_FAILED;
        s.error = errorStatus(e);
        s.endTime = new Date();
      }),
    )
    .catch(() => undefined);
}
