import type { ChannelCredentials } from '@grpc/grpc-js';
import { createClient, type ServiceClient } from './grpc';
import type { Logger } from './logger';
import * as pb from './proto';
import { SdmeshError } from './errors';
import { Reason } from './reasons';

/** What the agent needs from this host's lockspaces (the lease-manager that runs it). */
export interface HostLockspaces {
  list(): pb.Lockspace[] | Promise<pb.Lockspace[]>;
  /**
   * Starts joining (does not wait for the join to finish); `epoch` is the scheduler's order (see
   * LeaseManager.checkJoinOrder). Returns the lockspace as it is then (NOT_JOINED: nothing done).
   */
  join(req: { name: string; path: string; hostId: number; ioTimeoutSeconds: number; epoch: number }): Promise<pb.Lockspace>;
  /** Records the scheduler's leave order (epoch) and starts leaving the lockspace if this host is in it. */
  leave(req: { name: string; epoch: number }): Promise<pb.Lockspace>;
}

export interface HostAgentOptions {
  /** Scheduler replicas (host:port); tried in turn, starting with the last one that answered. */
  schedulerAddresses: string[];
  hostName: string;
  /** This host's configured host id (the one it asks the scheduler for). */
  hostId: number;
  intervalMs: number;
  /** Advertised addresses of this host's services (what the scheduler dials). */
  addresses: { leaseManager: string; metadataTx: string; dataMover: string; gc: string };
  lockspaces: HostLockspaces;
  log: Logger;
  /** mTLS as this host's lease-manager, accepting only a scheduler's certificate. */
  credentials: ChannelCredentials;
  /** Per-call timeout (default min(interval, 5 s)). */
  timeoutMs?: number;
}

const JOINED = pb.LockspaceState.LOCKSPACE_STATE_JOINED;
const JOINING = pb.LockspaceState.LOCKSPACE_STATE_JOINING;
const NOT_JOINED = pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED;

/**
 * Announces this host to the scheduler: every `intervalMs` a `HostService.Heartbeat` with the
 * host's name, its services' advertised addresses, the domains whose lockspaces it joined (or
 * is joining) and its liveness there. The scheduler answers with the host id to use in every
 * registered active domain and where each lockspace is; the agent starts joining those it has
 * no lockspace for, or has left on a scheduler's order (a new node learns every domain this way,
 * a host that missed an activation catches up). The join carries the domain's activation epoch,
 * so the lease-manager refuses it when a later order made the host leave (an answer older than
 * a deactivation, or the host's maintenance). A lockspace left by hand, lost or failed is left
 * to whoever manages it. The answer's leave orders (deactivated and removed domains; every domain
 * while the host is in maintenance) are passed on to the lease-manager, which leaves and refuses
 * older joins from then on.
 */
export class HostAgent {
  private timer?: NodeJS.Timeout;
  private readonly clients: ServiceClient<typeof pb.HostServiceDefinition>[];
  private next = 0;
  private running?: Promise<void>;
  private stopped = false;
  /** Beats that reached a scheduler (for tests and logs). */
  beats = 0;
  lastError = '';

  constructor(private readonly opts: HostAgentOptions) {
    if (opts.schedulerAddresses.length === 0) throw new Error('HostAgent needs at least one scheduler address');
    this.clients = opts.schedulerAddresses.map((a) => createClient(pb.HostServiceDefinition, a, opts.credentials));
  }

  start(): void {
    const tick = () => {
      if (this.running || this.stopped) return;
      this.running = this.beat()
        .then(() => undefined)
        .catch((err: unknown) => {
          const msg = err instanceof Error ? err.message : String(err);
          if (msg !== this.lastError) this.opts.log.warn({ err: msg }, 'heartbeat to the scheduler failed (retrying every interval)');
          this.lastError = msg;
        })
        .finally(() => (this.running = undefined));
    };
    tick();
    this.timer = setInterval(tick, this.opts.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    await this.running;
    for (const c of this.clients) c.close();
  }

  /** The announcement as it would be sent now. */
  async announcement(): Promise<pb.Host> {
    const lockspaces = await this.opts.lockspaces.list();
    const joined = lockspaces.filter((l) => l.state === JOINED);
    const hostIds: Record<string, number> = {};
    const liveness: Record<string, pb.HostLiveness> = {};
    for (const l of joined) {
      hostIds[l.name] = l.hostId || this.opts.hostId;
      liveness[l.name] = pb.HostLiveness.HOST_LIVENESS_LIVE;
    }
    // The scheduler wants one id for the host (the same in every domain).
    const ids = new Set(Object.values(hostIds));
    const oneId = ids.size === 1 ? [...ids][0]! : this.opts.hostId;
    const uniform: Record<string, number> = {};
    for (const d of Object.keys(hostIds)) uniform[d] = oneId;
    return pb.Host.fromPartial({
      name: this.opts.hostName,
      hostIds: Object.keys(uniform).length ? uniform : { '': oneId },
      liveness,
      leaseManagerAddress: this.opts.addresses.leaseManager,
      metadataTxAddress: this.opts.addresses.metadataTx,
      dataMoverAddress: this.opts.addresses.dataMover,
      gcAddress: this.opts.addresses.gc,
      reachableDomains: lockspaces
        .filter((l) => l.state === JOINED || l.state === JOINING)
        .map((l) => l.name)
        .sort(),
      healthy: true,
      lastHeartbeatTime: new Date(),
    });
  }

  /** One heartbeat: send, then join the lockspaces the scheduler lists that this host lacks. */
  async beat(): Promise<pb.HeartbeatResponse> {
    const host = await this.announcement();
    const timeoutMs = this.opts.timeoutMs ?? Math.min(this.opts.intervalMs, 5000);
    let lastErr: unknown;
    for (let i = 0; i < this.clients.length; i++) {
      const at = (this.next + i) % this.clients.length;
      try {
        const res = await this.clients[at]!.heartbeat({ host }, { timeoutMs });
        this.next = at;
        this.beats++;
        if (this.lastError) this.opts.log.info({ scheduler: this.opts.schedulerAddresses[at] }, 'heartbeat reached the scheduler again');
        this.lastError = '';
        await this.apply(res);
        return res;
      } catch (err) {
        lastErr = err;
      }
    }
    throw lastErr instanceof Error ? lastErr : new Error(String(lastErr));
  }

  private async apply(res: pb.HeartbeatResponse): Promise<void> {
    for (const d of res.leave) {
      await this.opts.lockspaces.leave({ name: d.storageDomainId, epoch: d.epoch }).then(
        (ls) => ls.state !== NOT_JOINED && this.opts.log.info({ domain: d.storageDomainId }, 'leaving the lockspace of a domain the scheduler says is left'),
        (err: unknown) => this.opts.log.warn({ domain: d.storageDomainId, err: String(err) }, 'could not leave the lockspace (next heartbeat)'),
      );
    }
    const known = new Map((await this.opts.lockspaces.list()).map((l) => [l.name, l]));
    for (const d of res.domains) {
      const have = known.get(d.storageDomainId);
      if (have && have.state !== NOT_JOINED) {
        if (have.state === JOINED && have.hostId && d.hostId && have.hostId !== d.hostId) {
          this.opts.log.warn(
            { domain: d.storageDomainId, joinedAs: have.hostId, assigned: d.hostId },
            'lockspace joined with another host id than the scheduler assigned',
          );
        }
        continue;
      }
      await this.opts.lockspaces
        .join({ name: d.storageDomainId, path: d.idsPath, hostId: d.hostId || this.opts.hostId, ioTimeoutSeconds: d.ioTimeoutSeconds, epoch: d.epoch })
        .then((ls) => {
          if (ls.state !== NOT_JOINED)
            this.opts.log.info({ domain: d.storageDomainId, hostId: d.hostId, path: d.idsPath }, 'joining the lockspace of a domain the scheduler announced');
        })
        .catch((err: unknown) => {
          const left = err instanceof SdmeshError && err.reason === Reason.LOCKSPACE_LEFT;
          this.opts.log[left ? 'debug' : 'warn']({ domain: d.storageDomainId, err: String(err) }, 'could not start joining the lockspace');
        });
    }
  }
}
