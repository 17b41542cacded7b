import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import * as sanlock from '@sdmesh/sanlock';
import { audit } from './audit';
import { LEASE_MODE } from './enums';
import { aborted, failedPrecondition, SdmeshError } from './errors';
import { createClient, deadlineOf, type CallOptions, type ServiceClient } from './grpc-client';
import type { Logger } from './logger';
import * as pb from './lease-proto';
import { LOCAL_LEASE_CHANNEL_OPTIONS, untilLeaseManagerAnswers } from './lease-manager-restart';
import { LeaseFramesClient, type LeaseCalls } from './lease-frames-client';
import { leaseFramesSocketPath } from './lease-frames';
import { hasReason, isLeaseHeldByAnother, Reason } from './reasons';
import { retry, type RetryPolicy } from './retry';

/**
 * Releasing a lease: retried while the lease-manager does not answer, long enough for a supervised
 * restart (seconds), short enough that a short-lived holder (a copy worker, whose exit frees its
 * leases anyway) does not linger when the lease-manager stays down.
 */
const RELEASE_RETRY: RetryPolicy = {
  totalMs: 20_000,
  initialBackoffMs: 200,
  maxBackoffMs: 2000,
  retryable: (err) => [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED].includes(SdmeshError.from(err).code),
};

export type LeaseMode = 'exclusive' | 'shared';

/** A lease to take, and in which mode (LeaseHolder.withLeases). */
export interface WantedLease {
  location: pb.LeaseLocation;
  mode: LeaseMode;
}

const KILL_PROGRAMS = ['/usr/bin/kill', '/bin/kill'];

/** Errors of an acquire call after which the lease may have been granted, the answer lost. */
const ANSWER_MAYBE_LOST = new Set<number>([grpc.status.CANCELLED, grpc.status.DEADLINE_EXCEEDED, grpc.status.UNAVAILABLE]);

/** Release notices an AcquireLease takes along at most (the lease-manager's limit). */
const MAX_NOTICES_PER_ACQUIRE = 8;

/**
 * This process as a lease holder (see docs/lease-binding.md). It registers with its host's
 * sanlock daemon, so every lease the lease-manager acquires for it (by pid) belongs to it:
 * the lease is released when this process exits, and if the host loses the lockspace sanlock
 * runs our kill path, `kill -KILL <pid>`, before any other host may take the lease. If the
 * daemon itself goes away nobody can fence us any more, so we fence ourselves.
 */
export class LeaseHolder {
  readonly pid = process.pid;
  /** The lease-manager's gRPC client (every call; the fallback of the frame socket). */
  readonly leaseManager: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
  /** The lease calls this holder makes: on the lease frame socket when the lease-manager serves it, else gRPC. */
  readonly leaseCalls: LeaseCalls;
  private readonly frames?: LeaseFramesClient;
  private joined = new Map<string, Promise<void>>();
  /** Per lease: resolves when the last queued in-process user is done with it. */
  private readonly localHolds = new Map<string, Promise<void>>();
  /** Release notices on their way to the lease-manager (see releaseOwn); close() waits for them. */
  private readonly notices = new Set<Promise<void>>();
  /**
   * Release notices not sent yet: the next acquire of this process takes them along (one call
   * instead of two); if none comes within this turn of the event loop, they go on their own.
   */
  private unsent: pb.ReleaseLeaseRequest[] = [];

  private constructor(
    private readonly client: sanlock.SanlockClient,
    leaseManagerAddress: string,
    private readonly log: Logger,
    transport: LeaseTransport,
  ) {
    this.leaseManager = localLeaseManagerClient(leaseManagerAddress);
    // `unix:/path` or `unix:///path` (the chart's form).
    const framesSocket = leaseFramesSocketPath(leaseManagerAddress.replace(/^unix:(\/\/(?=\/))?/, ''));
    if (transport !== 'grpc') this.frames = new LeaseFramesClient(framesSocket, transport === 'auto' ? this.leaseManager : undefined);
    this.leaseCalls = this.frames ? this.frames.calls() : this.leaseManager;
  }

  /**
   * Registers this process with the sanlock daemon of SANLOCK_RUN_DIR and sets the kill path.
   * Once per process: sanlock finds a holder by pid, so a second registration confuses it.
   */
  static async register(opts: {
    leaseManagerAddress: string;
    log: Logger;
    onFence?: (why: string) => void;
    /**
     * `auto` (default): the lease calls on the lease-manager's frame socket (lease-frames.ts) when
     * it serves one next to `leaseManagerAddress`, else gRPC; `frames`: the frame socket only (not
     * served: UNAVAILABLE); `grpc`: gRPC only. SDMESH_LEASE_TRANSPORT in the environment overrides it.
     */
    transport?: LeaseTransport;
  }): Promise<LeaseHolder> {
    const client = registerWithDaemon();
    const killProgram = KILL_PROGRAMS.find((p) => fs.existsSync(p));
    if (!killProgram) throw new Error('no kill program found (install procps): sanlock could not fence this process');
    await client.killpath(killProgram, '-KILL', { appendPid: true });
    await client.inquire(); // one round trip: the daemon has seen the registration
    const holder = new LeaseHolder(client, opts.leaseManagerAddress, opts.log, leaseTransport(opts.transport));
    client.on('hangup', (reason) => {
      const why = `sanlock daemon connection hung up (${reason}): leases can no longer be trusted`;
      opts.log.fatal({ reason }, 'fencing this process: ' + why);
      if (opts.onFence) opts.onFence(why);
      else process.kill(process.pid, 'SIGKILL');
    });
    return holder;
  }

  /** Joins a lockspace through the lease-manager (once per process; waits until joined; across a restart of the lease-manager). */
  async ensureLockspace(lockspace: string, idsPath: string, options: CallOptions = {}): Promise<void> {
    let p = this.joined.get(lockspace);
    if (!p) {
      p = untilLeaseManagerAnswers((each) => this.leaseCalls.joinLockspace({ lockspace, path: idsPath, wait: true }, each), options, {
        onRetry: this.logRetry('JoinLockspace'),
      })
        .then(() => undefined)
        .catch((err: unknown) => {
          this.joined.delete(lockspace);
          throw err;
        });
      this.joined.set(lockspace, p);
    }
    return p;
  }

  /** Forgets that a lockspace was joined (after LOCKSPACE_NOT_JOINED), so the next use rejoins. */
  forgetLockspace(lockspace: string): void {
    this.joined.delete(lockspace);
  }

  /** requestIfHeld: refused because another host holds it, the lease-manager records a request for it first (AcquireLeaseRequest.request_if_held). */
  async acquire(
    location: pb.LeaseLocation,
    mode: LeaseMode,
    operationId: string,
    opts: CallOptions & { wait?: boolean; requestIfHeld?: boolean } = {},
  ): Promise<pb.Lease> {
    return this.withNotices([location], opts, (released, each, wait) =>
      this.leaseCalls.acquireLease(
        {
          lease: location,
          mode: LEASE_MODE.toPb(mode),
          holderPid: this.pid,
          operationId,
          wait,
          released,
          requestIfHeld: opts.requestIfHeld ?? false,
        },
        each,
      ),
    );
  }

  /**
   * Several leases in one lease-manager call and one sanlock acquire (AcquireLeases, issue 17:
   * the copy's fixed cost): all or none, each in its own mode; the grants in the order asked.
   */
  async acquireMany(leases: readonly WantedLease[], operationId: string, opts: CallOptions & { wait?: boolean } = {}): Promise<pb.Lease[]> {
    const response = await this.withNotices(
      leases.map((l) => l.location),
      opts,
      (released, each, wait) =>
        this.leaseCalls.acquireLeases(
          {
            leases: leases.map((l) => ({ lease: l.location, mode: LEASE_MODE.toPb(l.mode) })),
            holderPid: this.pid,
            operationId,
            wait,
            released,
          },
          each,
        ),
    );
    return response.leases;
  }

  /**
   * An acquire call of these leases taking along the release notices not sent yet. A call that
   * ended CANCELLED, DEADLINE_EXCEEDED or UNAVAILABLE (its caller gave up, or the lease-manager
   * went away) may have been granted all the same,
   * the answer lost on its way: whatever of these leases sanlock now gives this process is released
   * before the error goes on, or it stays held for this process's whole life (found by the chaos
   * run: a DeleteImage cancelled during its volume lease's acquire kept the lease, and every later
   * operation on the disk failed LEASE_ALREADY_HELD). The lease-manager releases a grant whose
   * call was cancelled before the grant (the other half of the race).
   *
   * UNAVAILABLE (the lease-manager restarting: chaos runs saw every data job whose worker asked
   * for its leases then fail) is tried again within the call's deadline and signal
   * (untilLeaseManagerAnswers), each try only once the last one's grant, if any, is released: so
   * it ends with one grant or none. A grant that reached sanlock only after that release (the
   * dead lease-manager's request still queued in the daemon) is this process's already: sanlock
   * refuses the next try (LEASE_HELD_ON_THIS_HOST, or LEASE_ALREADY_HELD when the lease-manager's
   * table has it), so that try asks without waiting even when the caller waits (a waiting
   * lease-manager would retry that refusal until the deadline); the late grant is released and
   * the acquire tried again, and a refusal for a lease really held by another goes back to waiting.
   */
  private async withNotices<T>(
    locations: readonly pb.LeaseLocation[],
    opts: CallOptions & { wait?: boolean },
    call: (released: pb.ReleaseLeaseRequest[], each: CallOptions, wait: boolean) => Promise<T>,
  ): Promise<T> {
    /** An earlier try's answer may have been lost: the next try that reaches the lease-manager checks for a late grant. */
    let answerLost = false;
    let lateGrantReleased = false;
    /** That check found the leases held by others, not by this process: the caller waits for them. */
    let waitAfterCheck = false;
    const at = deadlineOf(opts);
    const fixed = { ...opts, timeoutMs: undefined, deadline: at === undefined ? undefined : new Date(at) };
    try {
      return await untilLeaseManagerAnswers(
        async (each) => {
          lateGrantReleased = false;
          const released = this.unsent.splice(0, MAX_NOTICES_PER_ACQUIRE);
          try {
            return await call(released, each, (opts.wait ?? false) && !answerLost);
          } catch (err) {
            // The call may not have reached the lease-manager: the notices again on their own (they are idempotent).
            if (released.length) this.queueNotices(released);
            const code = SdmeshError.from(err).code;
            if (ANSWER_MAYBE_LOST.has(code)) {
              answerLost = true;
              await this.releaseUnanswered(locations);
            } else if (answerLost && (isLeaseHeldByAnother(err) || hasReason(err, Reason.LEASE_ALREADY_HELD))) {
              lateGrantReleased = (await this.releaseUnanswered(locations)) > 0;
              waitAfterCheck = !lateGrantReleased && !!opts.wait;
            }
            throw err;
          }
        },
        fixed,
        { onRetry: this.logRetry('acquire'), alsoRetry: () => lateGrantReleased },
      );
    } catch (err) {
      if (!waitAfterCheck) throw err;
    }
    // Nothing of these leases is this process's: wait for them as asked (across another restart too).
    return this.withNotices(locations, fixed, call);
  }

  /** Logs a lease-manager call tried again (the first time as a warning: the lease-manager is away). */
  private logRetry(what: string): (err: unknown, attempt: number, waitMs: number) => void {
    return (err, attempt, waitMs) =>
      this.log[attempt === 1 ? 'warn' : 'debug']({ err: String(err), attempt, waitMs }, `${what}: the lease-manager did not answer; trying again`);
  }

  /** Releases those of these leases that sanlock gives this process (an acquire whose answer was lost); how many. */
  private async releaseUnanswered(locations: readonly pb.LeaseLocation[]): Promise<number> {
    const held = await this.client.inquire().catch(() => [] as sanlock.HeldResource[]);
    const granted = locations.filter((l) => held.some((h) => h.lockspace === l.lockspace && h.name === l.resource && h.offset === l.offset));
    for (const location of granted) {
      this.log.warn({ resource: location.resource }, 'an acquire whose answer was lost was granted: releasing the lease');
      await this.releaseSurely(location);
    }
    return granted.length;
  }

  async release(location: pb.LeaseLocation, opts: CallOptions = {}): Promise<void> {
    await this.leaseCalls.releaseLease({ lease: location, holderPid: this.pid }, opts);
  }

  /**
   * Releases a lease even across a restart of the lease-manager (which keeps its table of held
   * leases): until then sanlock still gives the lease to this live process, and a release given up
   * after one refused connection left the domain's metadata lease held for this process's whole
   * life, blocking every transaction of the domain (found by the chaos run, docs/chaos.md). Retried
   * for up to RELEASE_RETRY.totalMs; a lease this process no longer holds counts as released.
   */
  private async releaseSurely(location: pb.LeaseLocation): Promise<void> {
    try {
      await retry(RELEASE_RETRY, () => this.release(location, { timeoutMs: 5000 }));
    } catch (err) {
      if (hasReason(err, Reason.LEASE_NOT_HELD)) return;
      this.log.error({ err: String(err), resource: location.resource }, 'lease release failed: the lease stays held until this process exits');
    }
  }

  /**
   * Releases a lease this process was granted (`lease`: what acquire returned) in sanlock itself,
   * on its own registered connection, then tells the lease-manager (its table, metrics and events)
   * with this process's next acquire, or on its own right after this turn of the event loop,
   * without waiting for the answer. A process may always give up its own leases: this needs no
   * check of the lease-manager's, costs what the release costs in sanlock (no gRPC hop and no
   * lease-manager wake-up on the way), and no lease-manager restart can leave the lease held. The
   * notice names the grant (its acquire time), so a late one never forgets a newer grant. If
   * sanlock refuses, the lease-manager's release (releaseSurely) is the fallback.
   */
  private async releaseOwn(held: readonly (WantedLease & { lease: pb.Lease })[]): Promise<void> {
    // The chaos audit trail: written before sanlock frees the lease, as the lease-manager writes its grants and releases.
    for (const { location, mode, lease } of held) {
      audit({
        kind: 'lease-release',
        host: process.env.SDMESH_HOST_NAME ?? `host-id-${lease.hostId}`,
        pid: this.pid,
        lockspace: location.lockspace,
        resource: location.resource,
        mode,
        offset: location.offset,
      });
    }
    try {
      // Several leases (withLeases) in one call too.
      await this.client.releaseMany(held.map(({ location: l }) => ({ lockspace: l.lockspace, name: l.resource, path: l.path, offset: l.offset })));
    } catch (err) {
      this.log.warn(
        { err: String(err), resources: held.map((h) => h.location.resource) },
        'own release refused by sanlock; releasing through the lease-manager',
      );
      await Promise.all(held.map((h) => this.releaseSurely(h.location)));
      return;
    }
    this.queueNotices(held.map(({ location, lease }) => ({ lease: location, holderPid: this.pid, releasedByHolder: true, acquireTime: lease.acquireTime })));
  }

  /** Queues release notices: sent with this process's next acquire, or on their own after this turn of the event loop. */
  private queueNotices(notices: pb.ReleaseLeaseRequest[]): void {
    if (!this.unsent.length) setImmediate(() => this.sendNotices());
    this.unsent.push(...notices);
  }

  /** Sends the release notices no acquire took along, each as a ReleaseLease call. */
  private sendNotices(): void {
    for (const req of this.unsent.splice(0)) {
      const notice = this.leaseCalls
        .releaseLease(req, { timeoutMs: 5000 })
        .then(
          () => undefined,
          // Only the lease-manager's bookkeeping is late: it finds the lease gone when this process asks again or exits.
          (err: unknown) => this.log.debug({ err: String(err), resource: req.lease?.resource }, 'release notice not delivered'),
        )
        .finally(() => this.notices.delete(notice));
      this.notices.add(notice);
    }
  }

  /**
   * Holds the lease while fn runs; always releases it afterwards. Calls of this process for
   * the same lease queue here first (sanlock lets one process hold a resource once, so a
   * second acquire by the same holder would be refused): in-process locks before leases.
   * Without `wait`, a lease this process already holds fails at once with
   * ABORTED LEASE_HELD_ON_THIS_HOST, like one held by another process.
   */
  async withLease<T>(
    location: pb.LeaseLocation,
    mode: LeaseMode,
    operationId: string,
    fn: (lease: pb.Lease) => Promise<T>,
    opts: CallOptions & { wait?: boolean; requestIfHeld?: boolean } = {},
  ): Promise<T> {
    const turn = this.queueLocally([location], opts.wait ?? false);
    try {
      await abortable(turn.previous, opts.signal);
      const lease = await this.acquire(location, mode, operationId, opts);
      try {
        return await fn(lease);
      } finally {
        await this.releaseOwn([{ location, mode, lease }]);
      }
    } finally {
      turn.done();
    }
  }

  /**
   * withLease for several leases (up to 8) taken in one lease-manager call and one sanlock
   * acquire, all or none (acquireMany), each in its own mode; fn gets the grants in the order
   * asked. They queue here behind this process's other users of any of them (all at once, so
   * two such calls cannot wait on each other), and are released together, in sanlock by this
   * process, when fn settles. Without `wait`, one of them held by this process or by another
   * fails the call at once (ABORTED), nothing taken.
   */
  async withLeases<T>(
    leases: readonly WantedLease[],
    operationId: string,
    fn: (granted: pb.Lease[]) => Promise<T>,
    opts: CallOptions & { wait?: boolean } = {},
  ): Promise<T> {
    const turn = this.queueLocally(
      leases.map((l) => l.location),
      opts.wait ?? false,
    );
    try {
      await abortable(turn.previous, opts.signal);
      const granted = await this.acquireMany(leases, operationId, opts);
      try {
        return await fn(granted);
      } finally {
        await this.releaseOwn(leases.map((l, i) => ({ ...l, lease: granted[i]! })));
      }
    } finally {
      turn.done();
    }
  }

  /**
   * This process's turn at some leases: `previous` resolves when every earlier in-process user of
   * any of them is done; `done` ends the turn. Queued for all the leases at once (synchronously),
   * so turns are ordered and never wait in a cycle. Without `wait` a lease in use here fails at once.
   */
  private queueLocally(locations: readonly pb.LeaseLocation[], wait: boolean): { previous: Promise<void>; done: () => void } {
    const keys = locations.map((l) => `${l.lockspace}\0${l.resource}\0${l.path}\0${l.offset}`);
    const busy = locations.find((_, i) => this.localHolds.has(keys[i]!));
    if (busy && !wait) {
      throw aborted(
        `lease "${busy.resource}" of lockspace "${busy.lockspace}" is held by this process (pid ${this.pid}) for another operation`,
        Reason.LEASE_HELD_ON_THIS_HOST,
      );
    }
    let resolve!: () => void;
    const mine = new Promise<void>((r) => (resolve = r));
    const earlier: Promise<void>[] = [];
    const tails = keys.map((key) => {
      const before = this.localHolds.get(key);
      if (before) earlier.push(before);
      const tail = (before ?? Promise.resolve()).then(() => mine);
      this.localHolds.set(key, tail);
      return tail;
    });
    const done = () => {
      resolve();
      keys.forEach((key, i) => {
        if (this.localHolds.get(key) === tails[i]) this.localHolds.delete(key);
      });
    };
    return { previous: Promise.all(earlier).then(() => undefined), done };
  }

  /**
   * The registered connection to the sanlock daemon. The data-mover's worker passes it to the
   * qemu-img it starts (as an inherited fd, not close-on-exec there): sanlock frees this process's
   * leases when the connection closes, which is then when the last of the worker and its writer
   * is gone (docs/data-mover.md, "No write outlives its lease").
   */
  get registrationFd(): number {
    return this.client.fd;
  }

  /** Leases this process holds according to sanlock itself. */
  heldBySanlock(): Promise<sanlock.HeldResource[]> {
    return this.client.inquire();
  }

  /** Ends the registration (sanlock frees whatever this process still holds), then the lease-manager connection once the release notices are answered. */
  async close(): Promise<void> {
    await this.client.close();
    this.sendNotices();
    await Promise.all([...this.notices]);
    this.frames?.close();
    this.leaseManager.close();
  }
}

/**
 * A client of this host's lease-manager on its unix socket (`unix:/run/sdmesh/lease-manager.sock`).
 * No TLS there: the lease-manager knows the caller from the socket's peer credentials, and
 * the lease API is served nowhere else.
 */
export function localLeaseManagerClient(address: string): ServiceClient<typeof pb.LeaseManagerServiceDefinition> {
  if (!address.startsWith('unix:')) {
    throw new Error(`the lease-manager address must be its unix socket (unix:/path/to/lease-manager.sock), got "${address}": the lease API is host-local`);
  }
  return createClient(pb.LeaseManagerServiceDefinition, address, grpc.credentials.createInsecure(), LOCAL_LEASE_CHANNEL_OPTIONS);
}

export type LeaseTransport = 'auto' | 'frames' | 'grpc';

/** The transport asked for, unless SDMESH_LEASE_TRANSPORT says otherwise (operators, benches). */
function leaseTransport(asked: LeaseTransport | undefined): LeaseTransport {
  const env = process.env.SDMESH_LEASE_TRANSPORT;
  if (env === 'auto' || env === 'frames' || env === 'grpc') return env;
  if (env) throw new Error(`SDMESH_LEASE_TRANSPORT must be "auto", "frames" or "grpc", not "${env}"`);
  return asked ?? 'auto';
}

/**
 * Registers this process with the sanlock daemon. No daemon there (not started yet, or killed and
 * not yet back: its socket missing or refusing) is a state of the host, not a fault of this
 * process: FAILED_PRECONDITION SANLOCK_DOWN, not INTERNAL (found by chaos seed 702: a merge whose
 * worker started while its host's sanlock daemon was killed ended FAILED INTERNAL).
 */
function registerWithDaemon(): sanlock.SanlockClient {
  try {
    return sanlock.registerProcess();
  } catch (err) {
    if (sanlock.isSanlockError(err, sanlock.SanlockCode.ECONNREFUSED) || sanlock.isSanlockError(err, sanlock.SanlockCode.ENOENT)) {
      const socket = err.code === sanlock.SanlockCode.ECONNREFUSED ? 'its socket refuses connections' : 'no socket';
      const where = process.env.SANLOCK_RUN_DIR ? ` in ${process.env.SANLOCK_RUN_DIR}` : '';
      throw failedPrecondition(`no sanlock daemon of this host to register with${where} (${socket}): it is not running, or restarting`, Reason.SANLOCK_DOWN);
    }
    throw err;
  }
}

/** Waits for p, or rejects when the signal aborts (the queued caller gave up). */
function abortable(p: Promise<void>, signal?: AbortSignal): Promise<void> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(SdmeshError.from(signal.reason));
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(SdmeshError.from(signal.reason));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, reject);
  });
}
