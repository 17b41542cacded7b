import { DomainLeases, DomainLayout, hasReason, pb, Reason, SdmeshError, SPM_LEASE, type EventPublisher, type Logger } from '@sdmesh/common';
import type { DomainRegistry } from './domains';
import type { HostRegistry, HostState } from './hosts';

/**
 * SPM mode: one host at a time holds the SPM lease (slot 2 of the master domain = the
 * oldest registered domain) and runs every step. The scheduler cannot hold a sanlock lease
 * itself (it runs on no storage host), so it acquires the lease through a host's
 * lease-manager FOR that host's metadata-tx process (a registered sanlock holder whose pid
 * the host announces as spm_holder_pid). The lease lives and dies with that process: when the
 * host dies, sanlock frees it only after host_dead, and the next tick elects another host.
 * Storage is the truth: who is SPM is read from the lease owner, so several scheduler
 * replicas agree without talking to each other.
 */
export class SpmElector {
  private timer?: NodeJS.Timeout;
  private busy = false;

  constructor(private readonly opts: { hosts: HostRegistry; domains: DomainRegistry; log: Logger; events: EventPublisher; pollMs: number }) {}

  start(): void {
    const tick = () => {
      if (this.busy) return;
      this.busy = true;
      this.tick()
        .catch((err: unknown) => this.opts.log.warn({ err: String(err) }, 'SPM election round failed'))
        .finally(() => (this.busy = false));
    };
    this.timer = setInterval(tick, this.opts.pollMs);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  private set(host: string | undefined, elected: boolean): void {
    const { hosts } = this.opts;
    if (hosts.spmHost === host) return;
    this.opts.log.info({ spm: host ?? null, previous: hosts.spmHost ?? null }, host ? 'SPM host' : 'no SPM host');
    hosts.spmHost = host;
    if (host && elected) this.opts.events.publish({ $case: 'host', host: { kind: pb.HostEvent_Kind.KIND_SPM_ELECTED, host } });
  }

  async tick(): Promise<void> {
    const { hosts } = this.opts;
    const master = (await this.opts.domains.list())[0];
    hosts.noDomainsYet = !master;
    if (!master) return this.set(undefined, false);
    const location = DomainLeases.location({ id: master.id, path: master.path }, SPM_LEASE.resource, SPM_LEASE.slot);
    const joined = (h: HostState) => h.lockspaces.get(master.id) === pb.LockspaceState.LOCKSPACE_STATE_JOINED;
    const reporter = hosts.healthy().find(joined);
    if (reporter) {
      const owner = await reporter.clients.leases.getLeaseOwner({ lease: location }, { timeoutMs: 5000 });
      const { hosts: statuses } = await reporter.clients.leases.listLockspaceHosts({ lockspace: master.id }, { timeoutMs: 5000 });
      const liveness = new Map(statuses.map((s) => [s.hostId, s.liveness]));
      const holders = owner.ownerHostIds.filter((id) => {
        const l = liveness.get(id);
        return l !== pb.HostLiveness.HOST_LIVENESS_DEAD && l !== pb.HostLiveness.HOST_LIVENESS_FREE;
      });
      if (holders.length > 0) {
        const holder = [...hosts.hosts.values()].find((h) => h.spec.hostId === holders[0]);
        // A failing holder keeps the lease until sanlock declares it dead: no SPM meanwhile.
        const holderHeld = holder && holder.healthy ? await this.stillHeld(holder, location) : false;
        return this.set(holderHeld ? holder!.spec.name : undefined, false);
      }
    }
    // Nobody holds it (or its holder is dead): elect the least-loaded healthy host that can hold it.
    const candidates = hosts
      .healthy()
      .sort((a, b) => a.load.runningJobs + a.load.queuedJobs - (b.load.runningJobs + b.load.queuedJobs) || a.spec.name.localeCompare(b.spec.name));
    for (const h of candidates) {
      try {
        await h.clients.leases.joinLockspace({ lockspace: master.id, path: new DomainLayout(master.path).idsPath, wait: true }, { timeoutMs: 60_000 });
        // The host's metadata-tx takes the lease for itself: it runs every SPM step.
        await h.clients.metadata.acquireSpmLease({ domainPath: master.path }, { timeoutMs: 10_000 });
        return this.set(h.spec.name, true);
      } catch (err) {
        const e = SdmeshError.from(err);
        this.opts.log.info({ host: h.spec.name, reason: e.reason, err: e.message }, 'SPM lease not acquired');
        if (hasReason(e, Reason.LEASE_HELD)) return this.set(undefined, false); // another host (or replica) won or the old SPM is not dead yet
      }
    }
    this.set(undefined, false);
  }

  /** The holder's lease-manager still lists the SPM lease (its holder process is alive). */
  private async stillHeld(h: HostState, location: pb.LeaseLocation): Promise<boolean> {
    try {
      const { leases } = await h.clients.leases.listHeldLeases({}, { timeoutMs: 5000 });
      return leases.some((l) => l.location?.resource === location.resource && l.location.lockspace === location.lockspace);
    } catch {
      return false;
    }
  }
}
