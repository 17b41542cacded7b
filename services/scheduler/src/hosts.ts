import { createHash } from 'node:crypto';
import {
  checkHealth,
  createClient,
  failedPrecondition,
  invalidArgument,
  MAX_HOST_ID,
  notFound,
  pb,
  Reason,
  sameIdentity,
  unavailable,
  type EventPublisher,
  type HostServiceName,
  type Logger,
  type MeshTls,
  type ServiceClient,
} from '@sdmesh/common';
import { KvMirror } from './kv-mirror';
import { KvConflict, type KvStore } from './kv-store';
import type { SchedulerMetrics } from './metrics';

/** How to reach one host's per-host services (SDMESH_HOSTS entries, or a Heartbeat). */
export interface HostSpec {
  name: string;
  /** Host id the host uses in every lockspace (its lease-manager's configured id). */
  hostId: number;
  leaseManager: string;
  metadataTx: string;
  dataMover: string;
  gc?: string;
}

export interface HostClients {
  leases: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
  metadata: ServiceClient<typeof pb.MetadataTxServiceDefinition>;
  mover: ServiceClient<typeof pb.DataMoverServiceDefinition>;
  /** Credentials that accept only this host's metadata-tx (for health checks). */
  metadataCredentials: ReturnType<MeshTls['channelCredentials']>;
}

export interface HostState {
  spec: HostSpec;
  clients: HostClients;
  healthy: boolean;
  /** Consecutive failed polls. */
  failures: number;
  load: pb.HostLoad;
  lastSeenMs: number;
  /** Lockspace state on this host, by domain id. */
  lockspaces: Map<string, pb.LockspaceState>;
  /** Liveness of this host's id, per domain, as the other hosts' sanlock sees it. */
  liveness: Map<string, pb.HostLiveness>;
  /** Steps this replica has sent to the host and that have not ended. */
  inflight: number;
  placed: number;
  /** From Heartbeat: domains the host says it reaches (empty = not announced). */
  announcedDomains: string[];
  announced: boolean;
  lastHeartbeatMs: number;
  /** Host maintenance (shared through KV): while set no step is placed here. */
  maintenance?: HostMaintenance;
}

/**
 * A host's maintenance, in KV as `maintenance.<host>`: `entering` while its running steps
 * finish and it leaves its lockspaces, `in` once it has left them all. `epochMs` is the
 * scheduler's order (the lease-manager refuses older joins after it).
 */
export interface HostMaintenance {
  state: 'entering' | 'in';
  epochMs: number;
}

/** A lockspace hosts must not be in, and the epoch of the order that made them leave it. */
export interface LeaveOrder {
  id: string;
  epochMs: number;
}

export function parseHostsEnv(raw: string): HostSpec[] {
  if (!raw.trim()) return [];
  let list: unknown;
  try {
    list = JSON.parse(raw);
  } catch (err) {
    throw new Error(`SDMESH_HOSTS is not JSON: ${(err as Error).message}`);
  }
  if (!Array.isArray(list)) throw new Error('SDMESH_HOSTS must be a JSON list of {name, hostId, leaseManager, metadataTx, dataMover, gc}');
  return list.map((h: Partial<HostSpec>, i) => {
    if (!h.name || !h.hostId || !h.leaseManager || !h.metadataTx || !h.dataMover) {
      throw new Error(`SDMESH_HOSTS[${i}] needs name, hostId, leaseManager, metadataTx and dataMover`);
    }
    return h as HostSpec;
  });
}

export type Mode = 'sdm' | 'spm';

/** A lockspace a host is still in this long after the order to leave it is a stray: the poll tells the host to leave. */
const STRAY_AFTER_MS = 10_000;

/** Steps that move data (a data-mover job): spread by load. Every other step of a domain goes to that domain's host (place). */
const DATA_STEPS = new Set(['copy_volume', 'volume_job', 'image_transfer']);

/**
 * Every host this replica knows (configured, or announced by Heartbeat and shared through
 * KV), polled for health and load; picks the host for each step.
 */
export class HostRegistry {
  readonly hosts = new Map<string, HostState>();
  private timer?: NodeJS.Timeout;
  private polling = false;
  /** Host currently holding the SPM lease (SPM mode). */
  spmHost?: string;
  /** Set by the SPM elector: no domain is registered yet (so no SPM can exist). */
  noDomainsYet = true;

  constructor(
    private readonly opts: {
      kv: KvStore;
      log: Logger;
      events: EventPublisher;
      metrics: SchedulerMetrics;
      pollMs: number;
      /** Domains to follow liveness in (the active ones). */
      domainIds: () => Promise<string[]>;
      /** Lockspaces no host may be in (deactivated, being removed, removed): a host seen in one is told to leave it. */
      leaveOrders?: () => Promise<LeaveOrder[]>;
      mode: Mode;
      heartbeatTimeoutMs: number;
      /** A host known only from heartbeats is forgotten this long after its last one, once sanlock calls it dead everywhere (0 = never). */
      forgetAfterMs: number;
      /** Frees the host id of a forgotten host. */
      releaseHostId: (name: string) => Promise<void>;
      tls: MeshTls;
    },
  ) {
    this.announcements = new KvMirror(opts.kv, 'host', opts.log);
    this.maintenance = new KvMirror(opts.kv, 'maintenance', opts.log);
  }

  /** Host announcements and maintenance of the KV, followed by KV watches (each poll reads them here). */
  private readonly announcements: KvMirror;
  private readonly maintenance: KvMirror;

  add(spec: HostSpec): HostState {
    const existing = this.hosts.get(spec.name);
    if (existing && sameSpec(existing.spec, spec)) return existing;
    if (existing) closeClients(existing.clients);
    // Each client accepts only the named host's own service: an announced address that leads
    // anywhere else (another host, a proxy) fails the TLS handshake.
    const credentialsFor = (service: HostServiceName) => this.opts.tls.channelCredentials(sameIdentity({ kind: 'host', host: spec.name, service }));
    const metadataCredentials = credentialsFor('metadata-tx');
    const state: HostState = {
      spec,
      clients: {
        leases: createClient(pb.LeaseManagerServiceDefinition, spec.leaseManager, credentialsFor('lease-manager')),
        metadata: createClient(pb.MetadataTxServiceDefinition, spec.metadataTx, metadataCredentials),
        mover: createClient(pb.DataMoverServiceDefinition, spec.dataMover, credentialsFor('data-mover')),
        metadataCredentials,
      },
      healthy: existing?.healthy ?? false,
      failures: existing?.failures ?? 0,
      load: existing?.load ?? pb.HostLoad.fromPartial({}),
      lastSeenMs: existing?.lastSeenMs ?? 0,
      lockspaces: existing?.lockspaces ?? new Map(),
      liveness: existing?.liveness ?? new Map(),
      inflight: existing?.inflight ?? 0,
      placed: existing?.placed ?? 0,
      announcedDomains: existing?.announcedDomains ?? [],
      announced: existing?.announced ?? false,
      lastHeartbeatMs: existing?.lastHeartbeatMs ?? 0,
      maintenance: existing?.maintenance,
    };
    this.hosts.set(spec.name, state);
    return state;
  }

  start(): void {
    this.announcements.start();
    this.maintenance.start();
    const tick = () => {
      if (this.polling) return;
      this.polling = true;
      this.poll()
        .catch((err: unknown) => this.opts.log.warn({ err: String(err) }, 'host poll failed'))
        .finally(() => (this.polling = false));
    };
    tick();
    this.timer = setInterval(tick, this.opts.pollMs);
  }

  stop(): void {
    clearInterval(this.timer);
    this.announcements.stop();
    this.maintenance.stop();
    for (const h of this.hosts.values()) closeClients(h.clients);
  }

  /** Stores a host's announcement in KV so every replica learns it. */
  async heartbeat(host: pb.Host): Promise<HostState> {
    if (!host.name || !/^[A-Za-z0-9._-]{1,64}$/.test(host.name))
      throw invalidArgument('host.name must be 1..64 characters of [A-Za-z0-9._-]', Reason.INVALID_HOST);
    if (!host.leaseManagerAddress || !host.metadataTxAddress || !host.dataMoverAddress) {
      throw invalidArgument('a heartbeat needs the lease-manager, metadata-tx and data-mover addresses', Reason.INVALID_HOST);
    }
    const hostIds = Object.values(host.hostIds);
    const hostId = hostIds[0] ?? 0;
    if (hostId < 1 || hostId > MAX_HOST_ID || hostIds.some((id) => id !== hostId)) {
      throw invalidArgument(`host.host_ids must give one host id 1..${MAX_HOST_ID} (the same in every domain)`, Reason.INVALID_HOST_ID);
    }
    const value = JSON.stringify({ ...(pb.Host.toJSON(host) as object), lastHeartbeatMs: Date.now() });
    const key = `host.${host.name}`;
    const cur = await this.opts.kv.get(key);
    const revision = cur ? await this.opts.kv.update(key, value, cur.revision) : await this.opts.kv.create(key, value);
    this.announcements.noteWrite(key, value, revision);
    return this.applyAnnouncement(host, Date.now());
  }

  private applyAnnouncement(host: pb.Host, atMs: number): HostState {
    const state = this.add({
      name: host.name,
      hostId: Object.values(host.hostIds)[0] ?? 0,
      leaseManager: host.leaseManagerAddress,
      metadataTx: host.metadataTxAddress,
      dataMover: host.dataMoverAddress,
      gc: host.gcAddress,
    });
    state.announced = true;
    state.announcedDomains = host.reachableDomains;
    state.lastHeartbeatMs = Math.max(state.lastHeartbeatMs, atMs);
    if (host.load) state.load = host.load;
    return state;
  }

  /** Announcements of every replica's heartbeats, from the KV watch (no KV read per poll; none known until its first read is in). */
  private async loadAnnouncements(): Promise<void> {
    for (const value of this.announcements.values()?.values() ?? []) {
      const raw = JSON.parse(value) as { lastHeartbeatMs: number };
      this.applyAnnouncement(pb.Host.fromJSON(raw), raw.lastHeartbeatMs);
    }
  }

  /** One round: health and load of every host, lockspace states, liveness per domain. */
  async poll(): Promise<void> {
    await this.loadAnnouncements().catch(() => undefined);
    await this.loadMaintenance().catch(() => undefined);
    const domainIds = await this.opts.domainIds().catch(() => [] as string[]);
    const leaveOrders = (await this.opts.leaveOrders?.().catch(() => undefined)) ?? [];
    await Promise.all(
      [...this.hosts.values()].map(async (h) => {
        // Each service on its own: a host whose data-mover is down still shows its lockspaces.
        const [load, lockspaces, health] = await Promise.allSettled([
          h.clients.mover.getHostLoad({}, { timeoutMs: 2000 }),
          h.clients.leases.listLockspaces({}, { timeoutMs: 2000 }),
          checkHealth(h.spec.metadataTx, h.clients.metadataCredentials, '', 2000).then((s) => {
            if (s !== 'SERVING') throw unavailable(`metadata-tx is ${s}`);
          }),
        ]);
        if (lockspaces.status === 'fulfilled') {
          h.lockspaces = new Map(lockspaces.value.lockspaces.map((l) => [l.name, l.state]));
          this.leaveWhatMustBeLeft(h, leaveOrders);
        }
        const failed = [load, lockspaces, health].find((r) => r.status === 'rejected');
        if (!failed && load.status === 'fulfilled') {
          h.load = load.value;
          h.lastSeenMs = Date.now();
          h.failures = 0;
          this.setHealthy(h, true);
        } else {
          h.failures++;
          if (h.failures >= 2 || !h.healthy) this.setHealthy(h, false, String(failed?.status === 'rejected' ? failed.reason : ''));
        }
      }),
    );
    // Liveness only in active domains: a deactivated or removed domain shows none.
    for (const h of this.hosts.values()) for (const d of [...h.liveness.keys()]) if (!domainIds.includes(d)) h.liveness.delete(d);
    // Liveness of every host id per domain, from one healthy host that joined the domain.
    for (const domainId of domainIds) {
      const reporter = [...this.hosts.values()].find((h) => h.healthy && h.lockspaces.get(domainId) === pb.LockspaceState.LOCKSPACE_STATE_JOINED);
      if (!reporter) continue;
      try {
        const { hosts } = await reporter.clients.leases.listLockspaceHosts({ lockspace: domainId }, { timeoutMs: 2000 });
        const byId = new Map(hosts.map((s) => [s.hostId, s.liveness]));
        for (const h of this.hosts.values()) h.liveness.set(domainId, byId.get(h.spec.hostId) ?? pb.HostLiveness.HOST_LIVENESS_FREE);
      } catch {
        // next round
      }
    }
    await this.forgetSilentHosts(domainIds);
    this.opts.metrics.hostsHealthy.set([...this.hosts.values()].filter((h) => h.healthy).length);
    this.opts.metrics.hostsInMaintenance.set([...this.hosts.values()].filter((h) => h.maintenance).length);
  }

  /**
   * Hosts known only from heartbeats that stopped sending them are forgotten (entry,
   * announcement, host id), so fake or retired hosts do not pile up — but only once sanlock
   * says their host id is dead or free in every domain: a silent host that may still hold
   * leases keeps its id, so no other host can join with it.
   */
  private async forgetSilentHosts(domainIds: string[]): Promise<void> {
    if (!this.opts.forgetAfterMs) return;
    const now = Date.now();
    for (const h of [...this.hosts.values()]) {
      if (!h.announced || now - h.lastHeartbeatMs < this.opts.forgetAfterMs) continue;
      const deadEverywhere = domainIds.every((d) => {
        const l = h.liveness.get(d);
        return l === pb.HostLiveness.HOST_LIVENESS_DEAD || l === pb.HostLiveness.HOST_LIVENESS_FREE;
      });
      if (!deadEverywhere) continue;
      try {
        const entry = await this.opts.kv.get(`host.${h.spec.name}`);
        if (entry) {
          const raw = JSON.parse(entry.value) as { lastHeartbeatMs?: number };
          if (now - (raw.lastHeartbeatMs ?? 0) < this.opts.forgetAfterMs) continue; // it came back meanwhile
          await this.opts.kv.delete(`host.${h.spec.name}`, entry.revision);
          this.announcements.noteDelete(`host.${h.spec.name}`, entry.revision);
        }
        await this.opts.releaseHostId(h.spec.name);
      } catch (err) {
        this.opts.log.warn({ host: h.spec.name, err: String(err) }, 'could not forget a silent host (next round)');
        continue;
      }
      closeClients(h.clients);
      this.hosts.delete(h.spec.name);
      this.opts.log.info(
        { host: h.spec.name, hostId: h.spec.hostId, silentMs: now - h.lastHeartbeatMs },
        'host forgotten: no heartbeat and dead in every domain; its host id is free',
      );
      this.opts.events.publish({ $case: 'host', host: { kind: pb.HostEvent_Kind.KIND_DOWN, host: h.spec.name } });
    }
  }

  private readonly leaving = new Set<string>();

  /**
   * A host seen in a lockspace it must not be in (its domain deactivated or removed while the
   * host could not be told, or the host in maintenance) is told to leave it, with the order's
   * epoch so nothing joins it again from an older order. One leave at a time per lockspace.
   */
  private leaveWhatMustBeLeft(h: HostState, orders: LeaveOrder[]): void {
    const all = h.maintenance?.state === 'in' ? [...h.lockspaces.keys()].map((id) => ({ id, epochMs: h.maintenance!.epochMs })) : [];
    for (const order of [...orders, ...all]) {
      // A fresh order is still being carried out by its operation's leave step.
      if (Date.now() - order.epochMs < STRAY_AFTER_MS) continue;
      const st = h.lockspaces.get(order.id);
      if (st !== pb.LockspaceState.LOCKSPACE_STATE_JOINED && st !== pb.LockspaceState.LOCKSPACE_STATE_JOINING) continue;
      const key = `${h.spec.name}\0${order.id}`;
      if (this.leaving.has(key)) continue;
      this.leaving.add(key);
      this.opts.log.warn({ host: h.spec.name, lockspace: order.id }, 'host is in a lockspace it must have left: telling it to leave');
      this.opts.metrics.strayLockspaceLeaves.inc({ host: h.spec.name });
      h.clients.leases
        .leaveLockspace({ lockspace: order.id, wait: true, epoch: order.epochMs }, { timeoutMs: 30_000 })
        .catch((err: unknown) => this.opts.log.warn({ host: h.spec.name, lockspace: order.id, err: String(err) }, 'leave failed (next round)'))
        .finally(() => this.leaving.delete(key));
    }
  }

  private async loadMaintenance(): Promise<void> {
    const values = this.maintenance.values();
    if (!values) return; // the watch has not read KV yet: keep what this replica knows
    const seen = new Map<string, HostMaintenance>();
    for (const [key, value] of values) seen.set(key.slice('maintenance.'.length), JSON.parse(value) as HostMaintenance);
    for (const h of this.hosts.values()) h.maintenance = seen.get(h.spec.name);
  }

  /** Sets (or clears) a host's maintenance in KV, for every replica, and here at once. */
  async setMaintenance(name: string, maintenance: HostMaintenance | undefined): Promise<void> {
    const key = `maintenance.${name}`;
    for (;;) {
      const cur = await this.opts.kv.get(key);
      try {
        if (!maintenance) {
          if (cur) {
            await this.opts.kv.delete(key, cur.revision);
            this.maintenance.noteDelete(key, cur.revision);
          }
        } else {
          const value = JSON.stringify(maintenance);
          this.maintenance.noteWrite(key, value, cur ? await this.opts.kv.update(key, value, cur.revision) : await this.opts.kv.create(key, value));
        }
        break;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
    const h = this.hosts.get(name);
    if (h) h.maintenance = maintenance;
  }

  private setHealthy(h: HostState, healthy: boolean, why = ''): void {
    if (h.healthy === healthy) return;
    h.healthy = healthy;
    this.opts.log[healthy ? 'info' : 'warn']({ host: h.spec.name, why }, healthy ? 'host up' : 'host down');
    this.opts.events.publish({ $case: 'host', host: { kind: healthy ? pb.HostEvent_Kind.KIND_UP : pb.HostEvent_Kind.KIND_DOWN, host: h.spec.name } });
  }

  markFailed(name: string, why: string): void {
    const h = this.hosts.get(name);
    if (h) {
      h.failures = Math.max(h.failures, 2);
      this.setHealthy(h, false, why);
    }
  }

  get(name: string): HostState | undefined {
    return this.hosts.get(name);
  }

  healthy(): HostState[] {
    return [...this.hosts.values()].filter((h) => h.healthy);
  }

  /** Does this host reach the domain? (it announced it, or its lockspace there is not lost/failed) */
  reaches(h: HostState, domainId: string): boolean {
    if (h.announced && h.announcedDomains.length > 0) return h.announcedDomains.includes(domainId);
    const st = h.lockspaces.get(domainId);
    return st !== pb.LockspaceState.LOCKSPACE_STATE_LOST && st !== pb.LockspaceState.LOCKSPACE_STATE_FAILED;
  }

  /**
   * The host for one step. SDM: for a data step (a copy or volume job) the healthy host reaching
   * every domain with the least load (the data-mover's running + queued jobs plus the steps this
   * replica already sent there), ties broken by `spreadFrom` (a host running none of the step's
   * sibling jobs first: the volumes of one chain copy on different hosts) and then by fewest
   * placements so concurrent copies spread; for a metadata step the domain's hashed host among
   * those reaching it. SPM: the SPM host.
   * Returns the host and a release function to call when the step ends.
   */
  place(
    step: string,
    domainIds: string[],
    exclude: ReadonlySet<string> = new Set(),
    spreadFrom: ReadonlySet<string> = new Set(),
  ): { host: HostState; done: () => void } {
    let host: HostState | undefined;
    // SPM mode needs a master domain to hold the SPM lease in: the very first domain is
    // formatted on any host (the bootstrap step, as a pool is created in oVirt).
    const bootstrap = this.opts.mode === 'spm' && !this.spmHost && step === 'format_domain' && domainIds.length === 0 && this.noDomainsYet;
    if (this.opts.mode === 'spm' && !bootstrap) {
      host = this.spmHost ? this.hosts.get(this.spmHost) : undefined;
      if (!host || !host.healthy || exclude.has(host.spec.name)) throw unavailable('no SPM host is elected right now', Reason.NO_SPM);
    } else {
      const candidates = this.healthy().filter((h) => !h.maintenance && !exclude.has(h.spec.name) && domainIds.every((d) => this.reaches(h, d)));
      if (candidates.length === 0) {
        throw unavailable(`no healthy host reaches ${domainIds.length ? domainIds.join(', ') : 'the mesh'}`, Reason.NO_HOST);
      }
      if (domainIds.length > 0 && !DATA_STEPS.has(step)) {
        // A metadata step (it takes the domain's metadata lease): one host per domain, picked by
        // rendezvous hash among the candidates, so the domain's transactions meet on that host
        // and share lease holds (metadata-tx group commit) instead of passing the lease between
        // hosts for each one (measured: 8 moves' creates 4.8 s median spread over 3 hosts vs 0.26 s
        // on one). Another domain hashes to another host; a host that fails moves only its domains.
        const weight = (h: HostState) => createHash('sha256').update(`${domainIds[0]}/${h.spec.name}`).digest().readUInt32BE(0);
        host = candidates.reduce((best, h) => (weight(h) > weight(best) ? h : best));
      } else {
        // The data-mover's report lags (poll interval); our own count of steps sent there does not.
        const score = (h: HostState) => Math.max(h.load.runningJobs + h.load.queuedJobs, h.inflight);
        const sibling = (h: HostState) => (spreadFrom.has(h.spec.name) ? 1 : 0);
        candidates.sort((a, b) => score(a) - score(b) || sibling(a) - sibling(b) || a.placed - b.placed || a.spec.name.localeCompare(b.spec.name));
        host = candidates[0]!;
      }
    }
    return this.claim(host, step);
  }

  /**
   * A step that must run on one named host (an import reads a file only that host has):
   * NOT_FOUND HOST_NOT_FOUND if unknown, UNAVAILABLE HOST_UNAVAILABLE while it is down or
   * does not reach the domains. Ignores SPM mode: the file is only there.
   */
  placeOn(name: string, step: string, domainIds: string[]): { host: HostState; done: () => void } {
    const host = this.hosts.get(name);
    if (!host) throw notFound(`host ${name.slice(0, 64)} is not known`, Reason.HOST_NOT_FOUND);
    if (host.maintenance) throw failedPrecondition(`host ${name} is in maintenance: activate it first`, Reason.HOST_IN_MAINTENANCE);
    if (!host.healthy) throw unavailable(`host ${name} is not healthy right now`, Reason.HOST_UNAVAILABLE);
    const missing = domainIds.filter((d) => !this.reaches(host, d));
    if (missing.length) throw unavailable(`host ${name} does not reach storage domain ${missing.join(', ')}`, Reason.HOST_UNAVAILABLE);
    return this.claim(host, step);
  }

  private claim(host: HostState, step: string): { host: HostState; done: () => void } {
    const chosen = host;
    chosen.inflight++;
    chosen.placed++;
    this.opts.metrics.placements.inc({ host: chosen.spec.name, step });
    let released = false;
    return {
      host: chosen,
      done: () => {
        if (!released) chosen.inflight--;
        released = true;
      },
    };
  }

  toPublic(h: HostState): pb.Host {
    const hostIds: Record<string, number> = {};
    const liveness: Record<string, pb.HostLiveness> = {};
    for (const [d, st] of h.lockspaces) if (st === pb.LockspaceState.LOCKSPACE_STATE_JOINED) hostIds[d] = h.spec.hostId;
    for (const [d, l] of h.liveness) liveness[d] = l;
    return pb.Host.fromPartial({
      name: h.spec.name,
      hostIds,
      liveness,
      load: h.load,
      lastHeartbeatTime: h.lastSeenMs ? new Date(Math.max(h.lastSeenMs, h.lastHeartbeatMs)) : undefined,
      healthy: h.healthy,
      leaseManagerAddress: h.spec.leaseManager,
      metadataTxAddress: h.spec.metadataTx,
      dataMoverAddress: h.spec.dataMover,
      gcAddress: h.spec.gc ?? '',
      reachableDomains: h.announcedDomains.length
        ? h.announcedDomains
        : [...h.lockspaces.entries()].filter(([, s]) => s === pb.LockspaceState.LOCKSPACE_STATE_JOINED).map(([d]) => d),
      isSpm: this.spmHost === h.spec.name,
      maintenance: !!h.maintenance,
    });
  }
}

function sameSpec(a: HostSpec, b: HostSpec): boolean {
  return a.leaseManager === b.leaseManager && a.metadataTx === b.metadataTx && a.dataMover === b.dataMover && a.hostId === b.hostId;
}

function closeClients(c: HostClients): void {
  c.leases.close();
  c.metadata.close();
  c.mover.close();
}
