import fs from 'node:fs';
import path from 'node:path';
import * as sanlock from '@sdmesh/sanlock';
import {
  aborted,
  audit,
  EventPublisher,
  failedPrecondition,
  internal,
  invalidArgument,
  isLeaseHeldByAnother,
  LEASE_MODE,
  MAX_HOST_ID,
  notFound,
  parseLeaderRecord,
  pb,
  processRunning,
  readLeaderSector,
  Reason,
  SdmeshError,
  type Logger,
} from '@sdmesh/common';
import { LeaseMetrics } from './metrics';
import { checkHostId, checkIoTimeout, checkName, checkOffset, checkPath, checkPid, LEASE_AREA_BYTES, type LeaseLocation } from './validation';

/** The part of @sdmesh/sanlock the lease-manager uses (a seam for unit tests). */
export type SanlockApi = Pick<
  typeof sanlock,
  | 'addLockspace'
  | 'inqLockspace'
  | 'remLockspace'
  | 'getLockspaces'
  | 'getHosts'
  | 'acquireForPid'
  | 'acquireForPidAndInquire'
  | 'acquireManyForPidAndInquire'
  | 'releaseForPid'
  | 'inquireForPid'
  | 'writeLockspace'
  | 'readLockspace'
  | 'writeResource'
  | 'readResourceOwners'
  | 'registerProcess'
  | 'request'
>;

export type LockspaceStateName = 'NOT_JOINED' | 'JOINING' | 'JOINED' | 'LEAVING' | 'LOST' | 'FAILED';

interface LockspaceRecord {
  name: string;
  path: string;
  hostId: number;
  ioTimeout: number;
  state: LockspaceStateName;
  stateTime: Date;
  error: string;
  joined?: Promise<void>;
  /** The leave in progress, if any (a second leave waits for it). */
  leaving?: Promise<pb.Lockspace>;
}

export interface HeldLease {
  location: LeaseLocation;
  mode: 'exclusive' | 'shared';
  pid: number;
  operationId: string;
  lver: number;
  acquireTime: Date;
}

export interface LeaseManagerOptions {
  hostId: number;
  defaultIoTimeout: number;
  log: Logger;
  events: EventPublisher;
  metrics: LeaseMetrics;
  sanlock?: SanlockApi;
  /** Where the held-lease table is kept across restarts of this service ('' = nowhere). */
  stateDir?: string;
  /** How long a dead holder's lease is kept before it is reported released (default 3 s). */
  holderGraceMs?: number;
  /** Is this pid alive? (a seam for tests) */
  pidAlive?: (pid: number) => boolean;
  /**
   * Publish events after the current call's reply is on its way (the service: a NATS write wakes
   * nats-server, which on a busy host delays the reply by its wake-up) instead of at once, and
   * while calls come back to back at most every EVENT_BATCH_MS (each stamped when it happened).
   */
  eventsAfterReply?: boolean;
}

/** With eventsAfterReply, events are published at most this often (ms) while calls come back to back. */
const EVENT_BATCH_MS = 20;
/** The held-lease table file is written at most this often (ms) while calls come back to back. */
const TABLE_SAVE_BATCH_MS = 20;

const CONTENTION_CODES = new Set<number>([
  sanlock.SanlockCode.SANLK_ACQUIRE_IDLIVE,
  sanlock.SanlockCode.SANLK_ACQUIRE_OWNED,
  sanlock.SanlockCode.SANLK_ACQUIRE_OTHER,
  sanlock.SanlockCode.SANLK_ACQUIRE_SHRETRY,
  sanlock.SanlockCode.SANLK_ACQUIRE_OWNED_RETRY,
  sanlock.SanlockCode.EAGAIN,
]);
const UNFORMATTED_CODES = new Set<number>([
  sanlock.SanlockCode.SANLK_LEADER_MAGIC,
  sanlock.SanlockCode.SANLK_LEADER_VERSION,
  sanlock.SanlockCode.SANLK_LEADER_LOCKSPACE,
  sanlock.SanlockCode.SANLK_LEADER_RESOURCE,
  sanlock.SanlockCode.SANLK_LEADER_CHECKSUM,
  sanlock.SanlockCode.SANLK_LEADER_READ,
  -90, // EMSGSIZE: short read, the area lies beyond the end of the file
]);

const leaseKey = (l: LeaseLocation, pid: number) => `${l.lockspace}\0${l.resource}\0${l.path}\0${l.offset}\0${pid}`;
const areaKey = (l: LeaseLocation) => `${l.lockspace}\0${l.resource}\0${l.path}\0${l.offset}`;
const describe = (l: LeaseLocation) => `lease "${l.resource}" of lockspace "${l.lockspace}" (${l.path}@${l.offset})`;

/**
 * The lease-manager's logic: lockspaces of this host, resource leases taken on behalf of
 * registered holder processes, host liveness, and the monitor that notices lease loss.
 */
export class LeaseManager {
  private readonly lockspaces = new Map<string, LockspaceRecord>();
  /**
   * The scheduler's latest leave and join orders per lockspace (epoch ms, in memory): after a
   * leave order only a newer join order joins again, never a service's join on first use (a GC
   * pass, a stray step) nor a heartbeat answer computed before the leave.
   */
  private readonly orders = new Map<string, { leftAt: number; joinedAt: number }>();
  private readonly held = new Map<string, HeldLease>();
  private readonly sl: SanlockApi;
  private readonly pidAlive: (pid: number) => boolean;
  private watchClient?: sanlock.SanlockClient;
  private daemonLost = false;
  private monitorTimer?: NodeJS.Timeout;
  private monitoring = false;
  /** Leases whose holder was first seen dead at this time (ms). */
  private readonly deadHolders = new Map<string, number>();
  private readonly holderGraceMs: number;
  /** Events waiting to be published (eventsAfterReply), in order, each with the time it happened. */
  private pendingEvents: { payload: Parameters<EventPublisher['publish']>[0]; time: Date }[] = [];
  /** When events were last published (eventsAfterReply), ms since the epoch. */
  private eventsFlushedAt = 0;
  /** A write of the held-lease table is queued (saveHeldTableSoon). */
  private saveQueued = false;
  /** When the held-lease table was last written by saveHeldTableSoon, ms since the epoch. */
  private tableSavedAt = 0;

  constructor(private readonly opts: LeaseManagerOptions) {
    this.sl = opts.sanlock ?? sanlock;
    this.pidAlive = opts.pidAlive ?? processRunning;
    this.holderGraceMs = opts.holderGraceMs ?? 3000;
    this.loadOrders();
  }

  private get log(): Logger {
    return this.opts.log;
  }

  private publish(payload: Parameters<EventPublisher['publish']>[0]): void {
    if (!this.opts.eventsAfterReply) {
      this.opts.events.publish(payload);
      return;
    }
    // After the reply: setImmediate runs after this turn's microtasks, in which a handler's reply
    // is written. While calls come back to back, at most once per EVENT_BATCH_MS: each flush is a
    // NATS write that wakes nats-server (a JetStream append) beside the next calls' sanlock work
    // (issue 17: ~0.2 ms of this process's CPU per lease cycle, two flushes per acquire+release).
    if (!this.pendingEvents.length) {
      const wait = this.eventsFlushedAt + EVENT_BATCH_MS - Date.now();
      if (wait > 0) setTimeout(() => this.flushEvents(), wait).unref();
      else setImmediate(() => this.flushEvents());
    }
    this.pendingEvents.push({ payload, time: new Date() });
  }

  private flushEvents(): void {
    const events = this.pendingEvents;
    if (!events.length) return;
    this.pendingEvents = [];
    this.eventsFlushedAt = Date.now();
    for (const e of events) this.opts.events.publish(e.payload, e.time);
  }

  // ---------------------------------------------------------------- lifecycle

  /**
   * Connects to the daemon (a registered connection used only to notice the daemon dying),
   * learns the lockspaces it already has, reloads the held-lease table, starts the monitor.
   */
  async start(monitorIntervalMs = 1000): Promise<void> {
    await this.watchDaemon();
    await this.adoptDaemonLockspaces();
    await this.loadHeldTable();
    this.monitorTimer = setInterval(() => void this.monitorOnce(), monitorIntervalMs);
  }

  async stop(): Promise<void> {
    clearInterval(this.monitorTimer);
    this.flushEvents();
    await this.watchClient?.close().catch(() => undefined);
    this.saveHeldTable();
  }

  private async watchDaemon(): Promise<void> {
    const client = this.sl.registerProcess();
    await client.inquire();
    client.on('hangup', (reason) => void this.onDaemonLost(`the sanlock daemon went away (${reason})`));
    this.watchClient = client;
    this.daemonLost = false;
  }

  private async adoptDaemonLockspaces(): Promise<void> {
    for (const ls of await this.sl.getLockspaces()) {
      if (this.lockspaces.has(ls.name)) continue;
      const rec: LockspaceRecord = {
        name: ls.name,
        path: ls.path,
        hostId: ls.hostId,
        ioTimeout: 0,
        state: ls.adding ? 'JOINING' : ls.removing ? 'LEAVING' : 'JOINED',
        stateTime: new Date(),
        error: '',
      };
      this.setLockspace(rec);
      // A join the previous process started (it died, sanlock is still adding): followed to its
      // end like one started here, so a JoinLockspace(wait) waits for it instead of answering
      // JOINING at once and the next acquire failing LOCKSPACE_NOT_JOINED.
      if (rec.state === 'JOINING') rec.joined = this.awaitJoin(rec);
    }
  }

  // ---------------------------------------------------------------- lockspaces

  private setLockspace(rec: LockspaceRecord, state?: LockspaceStateName, error = ''): void {
    if (state) {
      rec.state = state;
      rec.stateTime = new Date();
      rec.error = error;
    }
    this.lockspaces.set(rec.name, rec);
    this.opts.metrics.setLockspaceState(rec.name, rec.state);
  }

  lockspaceView(name: string): pb.Lockspace {
    const rec = this.lockspaces.get(name);
    if (!rec) return pb.Lockspace.fromPartial({ name, state: pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED });
    return pb.Lockspace.fromPartial({
      name: rec.name,
      path: rec.path,
      hostId: rec.hostId,
      state: pb.LockspaceState[`LOCKSPACE_STATE_${rec.state}`],
      ioTimeoutSeconds: rec.ioTimeout,
      stateTime: rec.stateTime,
      error: rec.error,
    });
  }

  listLockspaces(): pb.Lockspace[] {
    return [...this.lockspaces.keys()].sort().map((n) => this.lockspaceView(n));
  }

  /** Writes an empty lockspace (delta leases for maxHosts host ids) into a file it creates if needed. */
  async formatLockspace(name: string, filePath: string, maxHosts: number, ioTimeout: number): Promise<void> {
    checkName('lockspace', name);
    checkPath('lockspace path', filePath);
    if (!Number.isInteger(maxHosts) || maxHosts < 0 || maxHosts > 2000) throw invalidArgument(`max_hosts must be 0..2000, got ${maxHosts}`);
    checkIoTimeout(ioTimeout);
    if (this.lockspaces.get(name)?.state === 'JOINED')
      throw failedPrecondition(`lockspace "${name}" is joined on this host; formatting it would destroy live delta leases`, Reason.LOCKSPACE_IN_USE);
    // A committed domain's lockspace is never formatted again: other hosts' delta leases live there.
    if (fs.existsSync(path.join(path.dirname(filePath), 'metadata'))) {
      throw failedPrecondition(
        `${filePath} belongs to a formatted storage domain (its dom_md/metadata exists); refusing to format its lockspace`,
        Reason.LOCKSPACE_IN_USE,
      );
    }
    ensureFileSize(filePath, LEASE_AREA_BYTES);
    await this.call(() => this.sl.writeLockspace({ name, path: filePath, maxHosts, ioTimeout }), `format lockspace "${name}"`);
  }

  /** Writes empty resource leases at the given offsets (growing the file as needed). */
  async formatLeases(leases: LeaseLocation[]): Promise<number> {
    // One descriptor per lease file for the whole call: the size checks and the leader reads share it.
    const files = new Map<string, LeaseFile>();
    try {
      for (const l of leases) {
        let file = files.get(l.path);
        if (!file) files.set(l.path, (file = openLeaseFile(l.path)));
        growTo(file.fd, l.offset + LEASE_AREA_BYTES);
        for (const h of this.held.values()) {
          if (areaKey(h.location) === areaKey(l)) throw failedPrecondition(`${describe(l)} is held by pid ${h.pid} on this host`, Reason.LEASE_AREA_IN_USE);
        }
        await this.refuseOwnedArea(l, file);
        await this.call(
          () => this.sl.writeResource({ lockspace: l.lockspace, name: l.resource, path: l.path, offset: l.offset }, { numHosts: MAX_HOST_ID }),
          `format ${describe(l)}`,
        );
      }
    } finally {
      for (const f of files.values()) fs.closeSync(f.fd);
    }
    return leases.length;
  }

  /** Refuses to format a lease area that a live host holds according to sanlock. */
  private async refuseOwnedArea(l: LeaseLocation, file: LeaseFile): Promise<void> {
    if (!(await mayHaveOwners(l, file))) return;
    const owners = await this.sl.readResourceOwners(l.lockspace, l.resource, l.path, l.offset).catch(() => undefined);
    const ownerIds = owners?.owners.map((o) => o.hostId).filter((id) => id > 0) ?? [];
    if (!ownerIds.length) return; // never formatted, or free
    const hosts = this.lockspaces.get(l.lockspace)?.state === 'JOINED' ? await this.sl.getHosts(l.lockspace, 0).catch(() => []) : [];
    const state = new Map(hosts.map((h) => [h.hostId, h.state]));
    const live = ownerIds.filter((id) => state.get(id) !== 'dead' && state.get(id) !== 'free');
    if (live.length)
      throw failedPrecondition(
        `${describe(l)} is owned by host id(s) ${live.join(', ')} according to sanlock; refusing to format it`,
        Reason.LEASE_AREA_IN_USE,
      );
  }

  /**
   * Starts joining a lockspace (sanlock add_lockspace, async). Joining an already joined or
   * joining lockspace with the same id is a no-op; with another id it is refused.
   */
  async joinLockspace(req: {
    name: string;
    path: string;
    hostId: number;
    ioTimeout: number;
    wait: boolean;
    signal?: AbortSignal;
    /** The scheduler's order this join follows (0 = a join on first use). */
    epoch?: number;
  }): Promise<pb.Lockspace> {
    const name = checkName('lockspace', req.name);
    const filePath = checkPath('lockspace path', req.path);
    const hostId = checkHostId(req.hostId || this.opts.hostId);
    this.checkJoinOrder(name, req.epoch ?? 0);
    // Already joined with this host id: nothing to read or ask sanlock (every holder process joins
    // each domain it uses once, e.g. each copy worker at its first lease: issue 17's lease path).
    const current = this.lockspaces.get(name);
    if (current?.state === 'JOINED' && current.hostId === hostId && !this.daemonLost) return this.lockspaceView(name);
    // Every host must use the io_timeout the lockspace was formatted with (sanlock computes
    // other hosts' death from it): take it from the lockspace itself unless told otherwise.
    const formatted = req.ioTimeout
      ? 0
      : await this.sl.readLockspace(filePath).then(
          (l) => l.ioTimeout,
          () => 0,
        );
    const ioTimeout = checkIoTimeout(req.ioTimeout || formatted || this.opts.defaultIoTimeout);
    if (this.daemonLost) throw failedPrecondition('the sanlock daemon of this host is not reachable', Reason.SANLOCK_DOWN);
    let rec = this.lockspaces.get(name);
    if (rec && (rec.state === 'JOINED' || rec.state === 'JOINING')) {
      if (rec.hostId !== hostId) {
        throw failedPrecondition(`lockspace "${name}" is already joined here with host id ${rec.hostId}, not ${hostId}`, Reason.HOST_ID_MISMATCH);
      }
    } else {
      if (!fs.existsSync(filePath))
        throw failedPrecondition(`lockspace file ${filePath} does not exist (format the domain first)`, Reason.LOCKSPACE_FILE_MISSING);
      rec = { name, path: filePath, hostId, ioTimeout, state: 'JOINING', stateTime: new Date(), error: '' };
      this.setLockspace(rec, 'JOINING');
      try {
        await this.sl.addLockspace({ name, hostId, path: filePath, ioTimeout, async: true });
      } catch (err) {
        if (!sanlock.isSanlockError(err, sanlock.SanlockCode.EEXIST)) {
          const msg = sanlockMessage(err);
          this.setLockspace(rec, 'FAILED', msg);
          throw failedPrecondition(`cannot join lockspace "${name}" as host id ${hostId}: ${msg}`, Reason.JOIN_FAILED);
        }
      }
      rec.joined = this.awaitJoin(rec);
    }
    if (req.wait && rec.joined) {
      await abortable(rec.joined, req.signal);
      if (rec.state !== 'JOINED') throw failedPrecondition(`joining lockspace "${name}" failed: ${rec.error}`, Reason.JOIN_FAILED);
    }
    return this.lockspaceView(name);
  }

  private async awaitJoin(rec: LockspaceRecord): Promise<void> {
    for (;;) {
      let state: sanlock.LockspaceState;
      try {
        state = await this.sl.inqLockspace({ name: rec.name, hostId: rec.hostId, path: rec.path });
      } catch (err) {
        state = 'not-joined';
        rec.error = sanlockMessage(err);
      }
      if (rec.state !== 'JOINING') return;
      if (state === 'joined') {
        this.setLockspace(rec, 'JOINED');
        this.log.info({ lockspace: rec.name, hostId: rec.hostId }, 'lockspace joined');
        this.publish({
          $case: 'lockspace',
          lockspace: { kind: pb.LockspaceEvent_Kind.KIND_JOINED, lockspace: rec.name, hostId: rec.hostId, reason: '' },
        });
        return;
      }
      if (state === 'not-joined') {
        const why = rec.error || 'sanlock gave up joining (host id in use by a live host, or the ids file is unreadable)';
        this.setLockspace(rec, 'FAILED', why);
        this.log.warn({ lockspace: rec.name, hostId: rec.hostId, why }, 'lockspace join failed');
        this.publish({
          $case: 'lockspace',
          lockspace: { kind: pb.LockspaceEvent_Kind.KIND_JOIN_FAILED, lockspace: rec.name, hostId: rec.hostId, reason: why },
        });
        return;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /**
   * A join the HostAgent starts from a heartbeat answer (no wait): a lockspace this host left on
   * a scheduler's order joins again if the answer is newer (checkJoinOrder); one left by hand
   * (no order) stays left.
   */
  async joinAnnounced(req: { name: string; path: string; hostId: number; ioTimeout: number; epoch: number }): Promise<pb.Lockspace> {
    const rec = this.lockspaces.get(req.name);
    if (rec?.state === 'NOT_JOINED' && !this.orders.get(req.name)?.leftAt) return this.lockspaceView(req.name);
    return this.joinLockspace({ ...req, wait: false });
  }

  /** Refuses a join that a later leave order overrides (LOCKSPACE_LEFT); records a join order. */
  private checkJoinOrder(name: string, epoch: number): void {
    const order = this.orders.get(name);
    if (order && order.leftAt > order.joinedAt && epoch <= order.leftAt) {
      const what = epoch ? `a join order of ${new Date(epoch).toISOString()}` : 'a join on first use';
      throw failedPrecondition(
        `lockspace "${name}" was left on the scheduler's order of ${new Date(order.leftAt).toISOString()}; ${what} does not join it again`,
        Reason.LOCKSPACE_LEFT,
      );
    }
    if (epoch > 0) this.setOrder(name, { leftAt: order?.leftAt ?? 0, joinedAt: Math.max(order?.joinedAt ?? 0, epoch) });
  }

  private setOrder(name: string, order: { leftAt: number; joinedAt: number }): void {
    const was = this.orders.get(name);
    if (was?.leftAt === order.leftAt && was.joinedAt === order.joinedAt) return;
    this.orders.set(name, order);
    const file = this.ordersFile;
    if (!file) return;
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(`${file}.tmp`, JSON.stringify(Object.fromEntries(this.orders)));
    fs.renameSync(`${file}.tmp`, file);
  }

  /**
   * Leaves a lockspace (sanlock rem_lockspace). With an `epoch` (the scheduler's order) it also
   * refuses later joins on first use and joins of older orders (checkJoinOrder).
   */
  async leaveLockspace(nameIn: string, wait: boolean, epoch = 0): Promise<pb.Lockspace> {
    const name = checkName('lockspace', nameIn);
    if (epoch > 0) {
      const order = this.orders.get(name);
      // An order older than the last join order is stale (the domain was activated or attached again since).
      if (order && epoch < order.joinedAt) return this.lockspaceView(name);
      this.setOrder(name, { leftAt: Math.max(order?.leftAt ?? 0, epoch), joinedAt: order?.joinedAt ?? 0 });
    }
    let rec = this.lockspaces.get(name);
    // A join still in progress ends first (sanlock can't remove a lockspace it is adding); a leave in progress is waited for.
    if (rec?.state === 'JOINING' && rec.joined) await rec.joined.catch(() => undefined);
    if (rec?.state === 'LEAVING' && rec.leaving) return rec.leaving;
    rec = this.lockspaces.get(name);
    if (!rec || rec.state === 'NOT_JOINED') return this.lockspaceView(name);
    const leaving = this.remove(rec).finally(() => (rec.leaving = undefined));
    rec.leaving = leaving;
    if (wait) return leaving;
    // Without wait the removal goes on (LEAVING until sanlock has removed it); its failure is logged.
    leaving.catch((err: unknown) => this.log.warn({ lockspace: name, err: String(err) }, 'leaving the lockspace failed'));
    return this.lockspaceView(name);
  }

  /** sanlock rem_lockspace, waited for: NOT_JOINED only once sanlock no longer has the lockspace. */
  private async remove(rec: LockspaceRecord): Promise<pb.Lockspace> {
    const name = rec.name;
    const users = [...this.held.values()].filter((h) => h.location.lockspace === name);
    if (users.length) {
      throw failedPrecondition(
        `lockspace "${name}" still has ${users.length} lease(s) held on this host (e.g. "${users[0]!.location.resource}" by pid ${users[0]!.pid})`,
        Reason.LOCKSPACE_IN_USE,
      );
    }
    this.setLockspace(rec, 'LEAVING');
    try {
      await this.sl.remLockspace({ name, hostId: rec.hostId, path: rec.path }, { async: false, unused: true });
    } catch (err) {
      if (!sanlock.isSanlockError(err, sanlock.SanlockCode.ENOENT)) {
        this.setLockspace(rec, 'JOINED');
        throw failedPrecondition(`cannot leave lockspace "${name}": ${sanlockMessage(err)}`, Reason.LEAVE_FAILED);
      }
    }
    this.setLockspace(rec, 'NOT_JOINED');
    this.publish({ $case: 'lockspace', lockspace: { kind: pb.LockspaceEvent_Kind.KIND_LEFT, lockspace: name, hostId: rec.hostId, reason: '' } });
    return this.lockspaceView(name);
  }

  private requireJoined(name: string): LockspaceRecord {
    const rec = this.lockspaces.get(name);
    if (!rec || rec.state !== 'JOINED') {
      const state = rec ? rec.state.toLowerCase().replace('_', ' ') : 'not joined';
      throw failedPrecondition(`lockspace "${name}" is ${state} on this host; join it first`, Reason.LOCKSPACE_NOT_JOINED);
    }
    return rec;
  }

  /** Every host id's liveness in a lockspace, from sanlock's host status. */
  async lockspaceHosts(nameIn: string): Promise<pb.HostIdStatus[]> {
    const rec = this.requireJoined(checkName('lockspace', nameIn));
    const hosts = await this.call(() => this.sl.getHosts(rec.name, 0), `read hosts of "${rec.name}"`);
    const now = new Date();
    const liveness: Record<sanlock.HostState, pb.HostLiveness> = {
      live: pb.HostLiveness.HOST_LIVENESS_LIVE,
      fail: pb.HostLiveness.HOST_LIVENESS_FAILING,
      dead: pb.HostLiveness.HOST_LIVENESS_DEAD,
      free: pb.HostLiveness.HOST_LIVENESS_FREE,
      unknown: pb.HostLiveness.HOST_LIVENESS_UNSPECIFIED,
    };
    return hosts
      .filter((h) => h.hostId > 0)
      .map((h) =>
        pb.HostIdStatus.fromPartial({
          lockspace: rec.name,
          hostId: h.hostId,
          liveness: liveness[h.state],
          generation: h.generation,
          renewalTimestamp: h.timestamp,
          observeTime: now,
        }),
      );
  }

  // ---------------------------------------------------------------- leases

  /**
   * Acquires a lease for a registered holder process. Contention fails fast with ABORTED
   * naming the holder; with `wait`, it retries until the signal aborts (the call deadline).
   */
  async acquire(req: {
    location: LeaseLocation;
    mode: 'exclusive' | 'shared';
    pid: number;
    operationId: string;
    wait: boolean;
    /** Refused (no wait, exclusive) because another host holds it: record a request for its next version first (requestNextVersion). */
    requestIfHeld?: boolean;
    signal?: AbortSignal;
  }): Promise<HeldLease> {
    const { location, mode } = req;
    const pid = checkPid(req.pid);
    checkOperationId(req.operationId);
    this.checkAcquirable(location, pid);
    await this.awaitOwnEarlierGrant(location, pid, req.wait, req.signal);
    const started = process.hrtime.bigint();
    let delay = 50;
    const resources = [{ name: location.resource, path: location.path, offset: location.offset }];
    /** After an exclusive acquire: the daemon's own view of the holder's leases (no disk I/O), for the lver. */
    let heldAfter: sanlock.HeldResource[] | undefined;
    for (;;) {
      try {
        // The lease version is the fencing token: an exclusive acquire asks the daemon for it on
        // the same worker thread, right after the acquire (one trip through the event loop, not two).
        if (mode === 'exclusive') heldAfter = await this.sl.acquireForPidAndInquire(pid, location.lockspace, resources, { ownerNoWait: true });
        else await this.sl.acquireForPid(pid, location.lockspace, resources, { shared: true, ownerNoWait: true });
        break;
      } catch (err) {
        const e = waitEnded(await this.acquireError(err, location, pid), req);
        const retriable = isLeaseHeldByAnother(e);
        if (!req.wait || !retriable) {
          this.acquireFailed(e, [{ location, mode }], location, pid, req.operationId, started);
          if (req.requestIfHeld && mode === 'exclusive' && e.reason === Reason.LEASE_HELD) await this.requestNextVersion(location);
          throw e;
        }
        await sleep(delay, req.signal);
        delay = Math.min(delay * 2, 1000);
      }
    }
    const lver = heldAfter?.find((r) => r.lockspace === location.lockspace && r.name === location.resource)?.lver ?? 0;
    const granted = this.recordGrant(location, mode, pid, req.operationId, lver, started);
    await this.undoIfCallerGone([granted], req.signal);
    return granted;
  }

  /**
   * Records in the lease area that a host wants the lease after its current holder
   * (sanlock_request for the next lease version, no force mode: sanlock neither signals nor
   * disturbs the holder). Written before the refusal is answered, so the caller knows it is on
   * storage. Best effort: it only lets a holder that reads it end its hold sooner.
   *
   * The version is named (the leader's lver + 1, from one direct read of the leader sector):
   * with no force mode and no version, sanlock clears the request record instead (its
   * "next version" flag applies only with a force mode).
   */
  private async requestNextVersion(l: LeaseLocation): Promise<void> {
    let file: fs.promises.FileHandle | undefined;
    try {
      file = await fs.promises.open(l.path, fs.constants.O_RDONLY | fs.constants.O_DIRECT).catch((err: NodeJS.ErrnoException) => {
        // A file system without O_DIRECT (tmpfs): through the page cache, as openLeaseFile does.
        if (err.code !== 'EINVAL') throw err;
        return fs.promises.open(l.path, fs.constants.O_RDONLY);
      });
      const leader = parseLeaderRecord(await readLeaderSector(file.fd, l.offset));
      // Released meanwhile, or not this lease's area: nothing to ask for.
      if (!leader || leader.free || leader.lockspace !== l.lockspace || leader.resource !== l.resource) return;
      await this.sl.request(l.lockspace, { name: l.resource, path: l.path, offset: l.offset }, { force: 0, lver: leader.lver + 1 });
    } catch (err) {
      this.log.debug({ err: String(err), lockspace: l.lockspace, resource: l.resource }, 'lease request not recorded');
    } finally {
      await file?.close().catch(() => undefined);
    }
  }

  /**
   * A grant whose call was cancelled meanwhile (the caller gave up: its answer would be lost) is
   * released at once, or the holder would keep a lease it never learned of for its whole life.
   * The holder covers the other half (LeaseHolder: the call cancelled after this check).
   */
  private async undoIfCallerGone(granted: readonly HeldLease[], signal?: AbortSignal): Promise<void> {
    if (!signal?.aborted) return;
    for (const g of granted) await this.release(g.location, g.pid).catch(() => undefined);
    throw SdmeshError.from(signal.reason);
  }

  /** The checks of an acquire before sanlock is asked (per lease): joined lockspace not being left, live holder, a lease area there. */
  private checkAcquirable(location: LeaseLocation, pid: number): void {
    this.requireJoined(location.lockspace);
    // Once the scheduler ordered this host out of the lockspace, no new lease there: the leave waits only for the running ones.
    const order = this.orders.get(location.lockspace);
    if (order && order.leftAt > order.joinedAt) {
      throw failedPrecondition(`lockspace "${location.lockspace}" is being left on the scheduler's order: no new lease there`, Reason.LOCKSPACE_LEFT);
    }
    if (!this.pidAlive(pid)) throw failedPrecondition(`holder pid ${pid} is not a running process on this host`, Reason.HOLDER_NOT_RUNNING);
    const fileSize = fs.statSync(location.path, { throwIfNoEntry: false })?.size;
    if (fileSize === undefined) throw failedPrecondition(`lease file ${location.path} does not exist`, Reason.LEASE_AREA_INVALID);
    if (location.offset + LEASE_AREA_BYTES > fileSize) {
      throw failedPrecondition(
        `no lease at ${location.path}@${location.offset}: the file ends at ${fileSize} (format the lease first)`,
        Reason.LEASE_AREA_INVALID,
      );
    }
  }

  /**
   * The same holder asking again for a lease the table says it has: with `wait`, it waits for its
   * own other operation to release (clients should queue such calls themselves; see
   * LeaseHolder.withLease), else LEASE_ALREADY_HELD.
   */
  private async awaitOwnEarlierGrant(location: LeaseLocation, pid: number, wait: boolean, signal?: AbortSignal): Promise<void> {
    for (let delay = 20, checked = false; ; delay = Math.min(delay * 2, 500)) {
      let existing = this.held.get(leaseKey(location, pid));
      // The holder may have released it itself, its notice not yet here (releasedByHolder): sanlock says.
      if (existing && !checked) {
        checked = true;
        const stale = existing;
        const actual = await this.sl.inquireForPid(pid).catch(() => undefined);
        if (actual && !actual.some((r) => r.lockspace === location.lockspace && r.name === location.resource && r.offset === location.offset)) {
          if (this.held.get(leaseKey(location, pid)) === stale) this.forget(stale, pb.LeaseEvent_Kind.KIND_RELEASED, 'released');
        }
        existing = this.held.get(leaseKey(location, pid));
      }
      if (!existing) return;
      if (!wait || signal?.aborted) {
        throw aborted(`${describe(location)} is already held by pid ${pid} (operation "${existing.operationId}")`, Reason.LEASE_ALREADY_HELD);
      }
      await sleep(delay, signal);
    }
  }

  /** A failed acquire of `leases`: the failure metric per lease, and the CONTENDED event of the one held by others. */
  private acquireFailed(
    e: SdmeshError,
    leases: readonly { location: LeaseLocation; mode: 'exclusive' | 'shared' }[],
    blamed: LeaseLocation,
    pid: number,
    operationId: string,
    started: bigint,
  ): void {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    for (const l of leases) this.opts.metrics.acquireFailed(l.mode, e.reason, seconds);
    if (!isLeaseHeldByAnother(e)) return;
    const mode = leases.find((l) => l.location === blamed)?.mode ?? 'exclusive';
    this.publish({
      $case: 'lease',
      lease: {
        kind: pb.LeaseEvent_Kind.KIND_CONTENDED,
        lease: toPbLocation(blamed),
        mode: toPbMode(mode),
        holderPid: pid,
        operationId,
        hostId: this.opts.hostId,
        reason: e.message,
      },
    });
  }

  /** A granted lease: the audit line, the table (its file written after the reply: saveHeldTableSoon), the metrics and the ACQUIRED event. */
  private recordGrant(location: LeaseLocation, mode: 'exclusive' | 'shared', pid: number, operationId: string, lver: number, started: bigint): HeldLease {
    const lease: HeldLease = { location, mode, pid, operationId, lver, acquireTime: new Date() };
    audit({
      kind: 'lease-grant',
      host: auditHost(this.opts.hostId),
      pid,
      lockspace: location.lockspace,
      resource: location.resource,
      mode,
      lver,
      offset: location.offset,
    });
    this.held.set(leaseKey(location, pid), lease);
    this.saveHeldTableSoon();
    this.opts.metrics.acquired(mode, Number(process.hrtime.bigint() - started) / 1e9);
    this.updateHeldGauge();
    this.publish({
      $case: 'lease',
      lease: {
        kind: pb.LeaseEvent_Kind.KIND_ACQUIRED,
        lease: toPbLocation(location),
        mode: toPbMode(mode),
        holderPid: pid,
        operationId,
        hostId: this.opts.hostId,
        reason: '',
      },
    });
    return lease;
  }

  // ---------------------------------------------------------------- several leases at once (issue 17: copy fixed cost)

  /**
   * Acquires up to 8 leases for one holder in one sanlock acquire, all or none (sanlock gives
   * back what it took when one fails), each in its own mode: a copy's shared source and exclusive
   * destination cost one call, one wake-up and one trip to the daemon instead of two. The checks,
   * table, audit lines, events and metrics are AcquireLease's, per lease. A failure names the
   * lease that caused it (for contention: one held by others, read from the lease areas).
   */
  async acquireMany(req: {
    leases: { location: LeaseLocation; mode: 'exclusive' | 'shared' }[];
    pid: number;
    operationId: string;
    wait: boolean;
    signal?: AbortSignal;
  }): Promise<HeldLease[]> {
    const pid = checkPid(req.pid);
    checkOperationId(req.operationId);
    const leases = checkLeaseSet(req.leases);
    for (const l of leases) this.checkAcquirable(l.location, pid);
    for (const l of leases) await this.awaitOwnEarlierGrant(l.location, pid, req.wait, req.signal);
    const started = process.hrtime.bigint();
    const specs = leases.map(({ location: l, mode }) => ({
      lockspace: l.lockspace,
      name: l.resource,
      path: l.path,
      offset: l.offset,
      shared: mode === 'shared',
    }));
    let heldAfter: sanlock.HeldResource[] | undefined;
    for (let delay = 50; ; delay = Math.min(delay * 2, 1000)) {
      try {
        heldAfter = await this.sl.acquireManyForPidAndInquire(pid, specs, { ownerNoWait: true });
        break;
      } catch (err) {
        const blamed = await this.blameAmong(err, leases);
        const e = waitEnded(await this.acquireError(err, blamed, pid), req);
        if (!req.wait || !isLeaseHeldByAnother(e)) {
          this.acquireFailed(e, leases, blamed, pid, req.operationId, started);
          throw e;
        }
        await sleep(delay, req.signal);
      }
    }
    const granted = leases.map(({ location: l, mode }) => {
      // The lease version of an exclusive lease is its fencing token (shared ones report 0).
      const lver = mode === 'exclusive' ? (heldAfter?.find((r) => r.lockspace === l.lockspace && r.name === l.resource)?.lver ?? 0) : 0;
      return this.recordGrant(l, mode, pid, req.operationId, lver, started);
    });
    await this.undoIfCallerGone(granted, req.signal);
    return granted;
  }

  /**
   * Which lease of a failed several-lease acquire to name (sanlock's one error code does not say):
   * for local contention one this host's table gives to another holder; for contention with other
   * hosts the first whose lease area shows an owner that excludes the mode asked for; else the first.
   */
  private async blameAmong(err: unknown, leases: readonly { location: LeaseLocation; mode: 'exclusive' | 'shared' }[]): Promise<LeaseLocation> {
    const first = leases[0]!.location;
    if (!sanlock.isSanlockError(err)) return first;
    if (err.code === sanlock.SanlockCode.EEXIST || err.code === sanlock.SanlockCode.EBUSY) {
      const local = leases.find((l) => [...this.held.values()].some((h) => areaKey(h.location) === areaKey(l.location)));
      return (local ?? leases[0]!).location;
    }
    if (!CONTENTION_CODES.has(err.code)) return first;
    for (const { location: l, mode } of leases) {
      const owners = await this.sl.readResourceOwners(l.lockspace, l.resource, l.path, l.offset).catch(() => undefined);
      const others = owners?.owners.filter((o) => o.hostId > 0 && o.hostId !== this.opts.hostId) ?? [];
      if (others.length && !(mode === 'shared' && owners?.shared)) return l;
    }
    return first;
  }

  /** Turns a sanlock acquire failure into the error the caller sees. */
  private async acquireError(err: unknown, l: LeaseLocation, pid: number): Promise<SdmeshError> {
    if (!sanlock.isSanlockError(err)) return err instanceof SdmeshError ? err : internal(String(err));
    const code = err.code;
    // EEXIST: another process of this host holds it; EBUSY: another process of this host is
    // acquiring it right now. Both are local contention and worth a retry.
    if (code === sanlock.SanlockCode.EEXIST || code === sanlock.SanlockCode.EBUSY) {
      const local = [...this.held.values()].find((h) => areaKey(h.location) === areaKey(l));
      const who = local ? `pid ${local.pid} for operation "${local.operationId}"` : 'another process';
      this.opts.metrics.contended(l.lockspace);
      return aborted(`${describe(l)} is held on this host (host id ${this.opts.hostId}) by ${who}`, Reason.LEASE_HELD_ON_THIS_HOST);
    }
    if (CONTENTION_CODES.has(code)) {
      this.opts.metrics.contended(l.lockspace);
      const owners = await this.sl.readResourceOwners(l.lockspace, l.resource, l.path, l.offset).catch(() => undefined);
      const ids = owners?.owners.map((o) => o.hostId).filter((id) => id > 0) ?? [];
      const holder = ids.length ? `host id${ids.length > 1 ? 's' : ''} ${ids.join(', ')}` : 'another host';
      const kind = owners?.shared ? 'shared' : 'exclusive';
      const failing = code === sanlock.SanlockCode.SANLK_ACQUIRE_OWNED_RETRY ? ' (that host is failing; the lease frees when sanlock declares it dead)' : '';
      return aborted(`${describe(l)} is held ${ids.length ? `(${kind}) ` : ''}by ${holder}${failing}`, Reason.LEASE_HELD);
    }
    if (code === sanlock.SanlockCode.ESRCH) {
      return failedPrecondition(
        `holder pid ${pid} is not registered with this host's sanlock daemon (it must call sanlock_register first)`,
        Reason.HOLDER_NOT_REGISTERED,
      );
    }
    // ENOSPC: sanlock's answer for a lockspace it no longer has or has failed on this host (its
    // renewals could not be written), not a full disk (chaos runs, lockspace-unwritable): the
    // caller joins again, as for a lockspace never joined.
    if (code === sanlock.SanlockCode.SANLK_ACQUIRE_LOCKSPACE || code === sanlock.SanlockCode.ENOENT || code === sanlock.SanlockCode.ENOSPC) {
      return failedPrecondition(
        `lockspace "${l.lockspace}" is not joined in this host's sanlock daemon${code === sanlock.SanlockCode.ENOSPC ? ' (lost or failed: its renewals could not be written)' : ''}`,
        Reason.LOCKSPACE_NOT_JOINED,
      );
    }
    if (UNFORMATTED_CODES.has(code)) {
      return failedPrecondition(
        `no valid lease "${l.resource}" of lockspace "${l.lockspace}" at ${l.path}@${l.offset} (${sanlock.describeSanlockError(code)}); format it first`,
        Reason.LEASE_AREA_INVALID,
      );
    }
    return failedPrecondition(`cannot acquire ${describe(l)}: ${sanlockMessage(err)}`, Reason.ACQUIRE_FAILED);
  }

  async release(location: LeaseLocation, pidIn: number): Promise<void> {
    const pid = checkPid(pidIn);
    const key = leaseKey(location, pid);
    const lease = this.held.get(key);
    if (!lease) {
      // This service restarted without a state dir (its table of held leases is gone) while sanlock still
      // gives the lease to the live holder: release it there, or it stays held for the holder's whole life
      // (found by the chaos run: a GC kept a domain's metadata lease after a lease-manager restart).
      const actual = await this.sl.inquireForPid(pid).catch(() => []);
      if (!actual.some((r) => r.lockspace === location.lockspace && r.name === location.resource && r.offset === location.offset)) {
        throw failedPrecondition(`${describe(location)} is not held by pid ${pid} on this host`, Reason.LEASE_NOT_HELD);
      }
      this.auditRelease(location, pid, 'exclusive');
      await this.sl.releaseForPid(pid, location.lockspace, [{ name: location.resource, path: location.path, offset: location.offset }]);
      return;
    }
    // Audited before sanlock frees it, so the next holder's grant never appears to precede this release.
    this.auditRelease(location, pid, lease.mode);
    try {
      await this.sl.releaseForPid(pid, location.lockspace, [{ name: location.resource, path: location.path, offset: location.offset }]);
    } catch (err) {
      // A holder that exited meanwhile already lost the lease: the release is done either way.
      if (this.pidAlive(pid)) throw failedPrecondition(`cannot release ${describe(location)}: ${sanlockMessage(err)}`, Reason.RELEASE_FAILED);
    }
    this.forget(lease, pb.LeaseEvent_Kind.KIND_RELEASED, 'released');
  }

  /**
   * A release its holder made itself, in sanlock on its own registered connection (a process may
   * always give up its own leases; LeaseHolder does so to spare the release a hop through this
   * service): only the table, the metrics and the RELEASED event, no sanlock call. The holder
   * wrote the audit line before its release. A notice about an older grant than the table's (a
   * newer acquire of the same lease by the same holder overtook it) changes nothing.
   */
  releasedByHolder(location: LeaseLocation, pidIn: number, acquireTime: Date): void {
    const lease = this.held.get(leaseKey(location, checkPid(pidIn)));
    if (!lease || lease.acquireTime.getTime() !== acquireTime.getTime()) return;
    this.forget(lease, pb.LeaseEvent_Kind.KIND_RELEASED, 'released');
  }

  /** The chaos audit line of a release (packages/common/src/audit.ts). */
  private auditRelease(location: LeaseLocation, pid: number, mode: 'exclusive' | 'shared'): void {
    audit({
      kind: 'lease-release',
      host: auditHost(this.opts.hostId),
      pid,
      lockspace: location.lockspace,
      resource: location.resource,
      mode,
      offset: location.offset,
    });
  }

  heldLeases(pid = 0): HeldLease[] {
    this.reapDeadHolders();
    return [...this.held.values()].filter((h) => !pid || h.pid === pid);
  }

  async leaseOwner(location: LeaseLocation): Promise<pb.LeaseOwner> {
    const owners = await this.call(
      () => this.sl.readResourceOwners(location.lockspace, location.resource, location.path, location.offset),
      `read ${describe(location)}`,
    );
    return pb.LeaseOwner.fromPartial({
      location: toPbLocation(location),
      lver: owners.lver,
      ownerHostIds: owners.owners.map((o) => o.hostId).filter((id) => id > 0),
    });
  }

  private forget(lease: HeldLease, kind: pb.LeaseEvent_Kind, reason: string): void {
    this.held.delete(leaseKey(lease.location, lease.pid));
    this.deadHolders.delete(leaseKey(lease.location, lease.pid));
    this.saveHeldTableSoon();
    this.updateHeldGauge();
    if (kind === pb.LeaseEvent_Kind.KIND_LOST) this.opts.metrics.lost(lease.location.lockspace);
    this.publish({
      $case: 'lease',
      lease: {
        kind,
        lease: toPbLocation(lease.location),
        mode: toPbMode(lease.mode),
        holderPid: lease.pid,
        operationId: lease.operationId,
        hostId: this.opts.hostId,
        reason,
      },
    });
  }

  private updateHeldGauge(): void {
    this.opts.metrics.setHeld([...this.held.values()].map((h) => ({ lockspace: h.location.lockspace, mode: h.mode })));
  }

  // ---------------------------------------------------------------- monitoring and fencing

  /**
   * Drops leases whose holder process is gone: sanlock released them when it exited. A holder
   * that died because sanlock fenced it (lockspace lost) must be reported as LOST, and sanlock
   * frees the lockspace a moment after killing its holders, so a dead holder is only called
   * "released" after a grace period in which its lockspace stayed joined.
   */
  private reapDeadHolders(): void {
    const now = Date.now();
    for (const [key, lease] of [...this.held.entries()]) {
      if (this.pidAlive(lease.pid)) continue;
      const since = this.deadHolders.get(key) ?? now;
      this.deadHolders.set(key, since);
      if (now - since < this.holderGraceMs) continue;
      this.deadHolders.delete(key);
      this.log.info({ pid: lease.pid, resource: lease.location.resource, operationId: lease.operationId }, 'holder exited: its lease was released');
      this.forget(lease, pb.LeaseEvent_Kind.KIND_RELEASED, 'holder process exited');
    }
  }

  /** One monitor pass: holders that died, lockspaces sanlock no longer has, the daemon itself. */
  async monitorOnce(): Promise<void> {
    if (this.monitoring) return;
    this.monitoring = true;
    try {
      if (this.daemonLost) {
        await this.watchDaemon().then(
          () => this.log.info('sanlock daemon is back; lockspaces must be joined again'),
          () => undefined,
        );
        return;
      }
      for (const rec of [...this.lockspaces.values()]) {
        if (rec.state !== 'JOINED') continue;
        let state: sanlock.LockspaceState | 'error';
        try {
          state = await this.sl.inqLockspace({ name: rec.name, hostId: rec.hostId, path: rec.path });
        } catch {
          state = 'error';
        }
        if (state === 'not-joined') this.onLockspaceLost(rec, 'sanlock dropped the lockspace: this host could not renew its delta lease');
      }
      this.reapDeadHolders();
    } finally {
      this.monitoring = false;
    }
  }

  /**
   * This host lost a lockspace: sanlock stops every holder of its leases (kill path or
   * SIGTERM/SIGKILL) before any other host may take them. Here we report it.
   */
  private onLockspaceLost(rec: LockspaceRecord, why: string): void {
    this.log.error({ lockspace: rec.name, hostId: rec.hostId, why }, 'lockspace lost');
    this.setLockspace(rec, 'LOST', why);
    this.publish({
      $case: 'lockspace',
      lockspace: { kind: pb.LockspaceEvent_Kind.KIND_LOST, lockspace: rec.name, hostId: rec.hostId, reason: why },
    });
    for (const lease of [...this.held.values()]) {
      if (lease.location.lockspace === rec.name) this.forget(lease, pb.LeaseEvent_Kind.KIND_LOST, why);
    }
  }

  private async onDaemonLost(why: string): Promise<void> {
    if (this.daemonLost) return;
    this.daemonLost = true;
    this.watchClient = undefined;
    this.log.error({ why }, 'sanlock daemon lost: every lease of this host is lost');
    for (const rec of [...this.lockspaces.values()]) {
      if (rec.state === 'JOINED' || rec.state === 'JOINING') this.onLockspaceLost(rec, why);
    }
    for (const lease of [...this.held.values()]) this.forget(lease, pb.LeaseEvent_Kind.KIND_LOST, why);
  }

  // ---------------------------------------------------------------- persistence

  private get ordersFile(): string | undefined {
    return this.opts.stateDir ? path.join(this.opts.stateDir, 'lockspace-orders.json') : undefined;
  }

  /** The scheduler's leave and join orders, kept across restarts of this service (checkJoinOrder). */
  private loadOrders(): void {
    const file = this.ordersFile;
    if (!file || !fs.existsSync(file)) return;
    try {
      const saved = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, { leftAt?: unknown; joinedAt?: unknown }>;
      for (const [name, o] of Object.entries(saved)) {
        if (typeof o?.leftAt === 'number' && typeof o.joinedAt === 'number') this.orders.set(name, { leftAt: o.leftAt, joinedAt: o.joinedAt });
      }
    } catch (err) {
      this.log.warn({ err: String(err) }, 'lockspace order table unreadable; starting empty');
    }
  }

  private get stateFile(): string | undefined {
    return this.opts.stateDir ? path.join(this.opts.stateDir, 'held-leases.json') : undefined;
  }

  /**
   * The table file written after the call's reply, and while calls come back to back at most every
   * TABLE_SAVE_BATCH_MS, once for all the changes in between (issue 17: a file write and rename per
   * grant and per release cost the lease-manager ~0.2 ms of CPU each, beside the calls' sanlock
   * work on the same cores). The table only lets a restarted lease-manager keep its bookkeeping:
   * what it lists is checked against sanlock when it is loaded, and a lease missing from it is
   * still released (release asks sanlock), so a restart before the write leaves no lease behind.
   */
  private saveHeldTableSoon(): void {
    if (!this.stateFile || this.saveQueued) return;
    this.saveQueued = true;
    const save = () => {
      this.saveQueued = false;
      this.tableSavedAt = Date.now();
      this.saveHeldTable();
    };
    const wait = this.tableSavedAt + TABLE_SAVE_BATCH_MS - Date.now();
    if (wait > 0) setTimeout(save, wait).unref();
    else setImmediate(save);
  }

  private saveHeldTable(): void {
    const file = this.stateFile;
    if (!file) return;
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const tmp = `${file}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify([...this.held.values()]));
    fs.renameSync(tmp, file);
  }

  /** After a restart of this service: keep the leases sanlock says their holders still have. */
  private async loadHeldTable(): Promise<void> {
    const file = this.stateFile;
    if (!file || !fs.existsSync(file)) return;
    let saved: HeldLease[] = [];
    try {
      saved = JSON.parse(fs.readFileSync(file, 'utf8')) as HeldLease[];
    } catch (err) {
      this.log.warn({ err: String(err) }, 'held-lease table unreadable; starting empty');
    }
    for (const lease of saved) {
      if (!this.pidAlive(lease.pid)) continue;
      const actual = await this.sl.inquireForPid(lease.pid).catch(() => []);
      const l = lease.location;
      if (actual.some((r) => r.lockspace === l.lockspace && r.name === l.resource && r.path === l.path && r.offset === l.offset)) {
        this.held.set(leaseKey(l, lease.pid), { ...lease, acquireTime: new Date(lease.acquireTime) });
      }
    }
    this.saveHeldTable();
    this.updateHeldGauge();
  }

  private async call<T>(fn: () => Promise<T>, what: string): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof SdmeshError) throw err;
      if (sanlock.isSanlockError(err) && err.code === sanlock.SanlockCode.ENOENT) throw notFound(`${what}: ${sanlockMessage(err)}`);
      throw failedPrecondition(`${what}: ${sanlockMessage(err)}`, Reason.SANLOCK_ERROR);
    }
  }
}

/** sanlock's limit of resources per acquire. */
export const MAX_LEASES_PER_ACQUIRE = sanlock.SANLK_MAX_RESOURCES;

function checkOperationId(operationId: string): void {
  if (Buffer.byteLength(operationId) > 128) throw invalidArgument('operation_id is longer than 128 bytes');
}

/** The leases of a several-lease acquire: 1..8, none twice (by lockspace and resource, nor by lease area). */
function checkLeaseSet<L extends { location: LeaseLocation }>(leases: readonly L[]): readonly L[] {
  if (!leases.length) throw invalidArgument('leases: give at least one lease to acquire');
  if (leases.length > MAX_LEASES_PER_ACQUIRE)
    throw invalidArgument(`leases: at most ${MAX_LEASES_PER_ACQUIRE} per call (sanlock's limit per acquire), got ${leases.length}`);
  const names = new Set<string>();
  const areas = new Set<string>();
  for (const { location: l } of leases) {
    const name = `${l.lockspace}\0${l.resource}`;
    const area = `${l.path}\0${l.offset}`;
    if (names.has(name) || areas.has(area)) throw invalidArgument(`leases: ${describe(l)} is asked for twice (a process holds a lease once)`);
    names.add(name);
    areas.add(area);
  }
  return leases;
}

function sanlockMessage(err: unknown): string {
  if (sanlock.isSanlockError(err)) return `${sanlock.describeSanlockError(err.code)} (${err.code})`;
  return err instanceof Error ? err.message : String(err);
}

export function toPbLocation(l: LeaseLocation): pb.LeaseLocation {
  return { lockspace: l.lockspace, resource: l.resource, path: l.path, offset: l.offset };
}

export const toPbMode = (m: 'exclusive' | 'shared'): pb.LeaseMode => LEASE_MODE.toPb(m);

/**
 * Whether sanlock could name owners of this area under this name. Its read_resource_owners fails
 * (no owners: the format goes ahead, as for a never-formatted area) unless the area's leader
 * record names this lockspace and resource, and it reads the whole area (1 MiB) to tell; a new
 * volume's area never names the new volume yet. One direct read of the leader sector answers
 * that here; sanlock is asked only when it names them, or when the read fails.
 */
async function mayHaveOwners(l: LeaseLocation, file: LeaseFile): Promise<boolean> {
  if (!file.direct) return true;
  try {
    const leader = parseLeaderRecord(await readLeaderSector(file.fd, l.offset));
    return leader?.lockspace === l.lockspace && leader.resource === l.resource;
  } catch {
    return true;
  }
}

/** A lease file opened for formatting; `direct`: opened O_DIRECT, so its leader sectors can be read past the page cache. */
interface LeaseFile {
  fd: number;
  direct: boolean;
}

/** Opens (creating if missing) a lease file read-write, with O_DIRECT where the file system allows it. */
function openLeaseFile(filePath: string): LeaseFile {
  const flags = fs.constants.O_RDWR | fs.constants.O_CREAT;
  try {
    return { fd: fs.openSync(filePath, flags | fs.constants.O_DIRECT, 0o660), direct: true };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
    return { fd: fs.openSync(filePath, flags, 0o660), direct: false };
  }
}

/** Extends an opened file (sparse) to at least size bytes. */
function growTo(fd: number, size: number): void {
  if (fs.fstatSync(fd).size < size) fs.ftruncateSync(fd, size);
}

/** Creates the file if missing and extends it (sparse) to at least size bytes. */
function ensureFileSize(filePath: string, size: number): void {
  const fd = fs.openSync(filePath, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o660);
  try {
    growTo(fd, size);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A waiting acquire refused once more after its deadline passed or its caller gave up: the answer
 * is that end (DEADLINE_EXCEEDED, CANCELLED), not the last try's refusal.
 */
function waitEnded(e: SdmeshError, req: { wait: boolean; signal?: AbortSignal }): SdmeshError {
  return req.wait && req.signal?.aborted && isLeaseHeldByAnother(e) ? SdmeshError.from(req.signal.reason) : e;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t);
        resolve();
      },
      { once: true },
    );
  });
}

function abortable<T>(p: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    signal.addEventListener('abort', () => reject(SdmeshError.from(signal.reason)), { once: true });
    p.then(resolve, reject);
  });
}

export { checkOffset };

/** This host in audit lines: its name when the mesh gave it one (every service has SDMESH_HOST_NAME), else its host id. */
const auditHost = (hostId: number): string => process.env.SDMESH_HOST_NAME ?? `host-id-${hostId}`;
