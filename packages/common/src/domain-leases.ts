import { SdmeshError } from './errors';
import type { CallOptions } from './grpc-client';
import type { LeaseHolder, LeaseMode } from './lease-holder';
import { untilLeaseManagerAnswers } from './lease-manager-restart';
import * as pb from './lease-proto';
import { DOMAIN_LEASE, DomainLayout, GC_LEASE, leaseOffset, RESERVED_LEASES, SPM_LEASE } from './storage/layout';
import { Reason } from './reasons';

export interface DomainRef {
  /** Domain id: also the sanlock lockspace name. */
  id: string;
  /** Absolute path of the domain directory. */
  path: string;
}

/** How long a lease is waited for when the caller gave no deadline. */
const DEFAULT_LEASE_WAIT_MS = 120_000;

/**
 * The leases of storage domains, taken through this host's lease-manager for this process
 * (a registered LeaseHolder): the domain metadata lease, volume leases, the GC and SPM leases.
 * Joins a domain's lockspace on first use.
 */
export class DomainLeases {
  constructor(readonly holder: LeaseHolder) {}

  /**
   * Whether nobody else held an exclusive lease between this holder's previous hold (its lver
   * then) and this one: sanlock bumps the lease version on every exclusive acquire, by any
   * process of any host, so lver = previous + 1 proves no acquire came in between. Unknown
   * versions (0 / absent: a provider without sanlock) prove nothing.
   */
  static heldAloneSince(previousLver: number | undefined, lver: number | undefined): boolean {
    return !!previousLver && !!lver && lver === previousLver + 1;
  }

  static location(domain: DomainRef, resource: string, slot: number): pb.LeaseLocation {
    return { lockspace: domain.id, resource, path: new DomainLayout(domain.path).leasesPath, offset: leaseOffset(slot) };
  }

  async ensureJoined(domain: DomainRef, opts: CallOptions = {}): Promise<void> {
    await this.holder.ensureLockspace(domain.id, new DomainLayout(domain.path).idsPath, opts);
  }

  /**
   * Holds a lease while fn runs. Waits while others hold it (until the signal aborts or, with
   * no signal, DEFAULT_LEASE_WAIT_MS) unless `wait` is false. Joins the lockspace (once) if this
   * host has not joined it or had lost it.
   */
  async withLease<T>(
    domain: DomainRef,
    resource: string,
    slot: number,
    mode: LeaseMode,
    operationId: string,
    fn: (lease: pb.Lease) => Promise<T>,
    opts: { signal?: AbortSignal; wait?: boolean; requestIfHeld?: boolean } = {},
  ): Promise<T> {
    const location = DomainLeases.location(domain, resource, slot);
    const call = { ...leaseCallOptions(opts), requestIfHeld: opts.requestIfHeld };
    // No join call before the acquire (a gRPC round trip per domain in every new process, e.g. each
    // copy worker): the lease-manager refuses an acquire in a lockspace it has not joined
    // (LOCKSPACE_NOT_JOINED, before anything is taken), and then the join comes first.
    return this.joiningOnRefusal([domain], opts.signal, () => this.holder.withLease(location, mode, operationId, fn, call));
  }

  /** Runs attempt; if the lease-manager refused it for a lockspace not joined, joins the domains' lockspaces and runs it again. */
  private async joiningOnRefusal<T>(domains: readonly DomainRef[], signal: AbortSignal | undefined, attempt: () => Promise<T>): Promise<T> {
    try {
      return await attempt();
    } catch (err) {
      if (err instanceof SdmeshError && err.reason === Reason.LOCKSPACE_NOT_JOINED) {
        for (const domain of domains) {
          this.holder.forgetLockspace(domain.id);
          await this.ensureJoined(domain, { signal });
        }
        return attempt();
      }
      throw err;
    }
  }

  /**
   * Several volumes' leases (up to 8), each in its own mode, held while fn runs: taken in one
   * lease-manager call and one sanlock acquire, all or none (LeaseHolder.withLeases), so no lease
   * order applies among them: nothing is held while waiting for another. Waits while others
   * hold any of them unless `wait` is false (a copy: false, then its leases one by one).
   */
  withVolumeLeases<T>(
    volumes: readonly { domain: DomainRef; volumeId: string; slot: number; mode: LeaseMode }[],
    operationId: string,
    fn: (leases: pb.Lease[]) => Promise<T>,
    opts: { signal?: AbortSignal; wait?: boolean } = {},
  ): Promise<T> {
    const leases = volumes.map((v) => ({ location: DomainLeases.location(v.domain, v.volumeId, v.slot), mode: v.mode }));
    const call = leaseCallOptions(opts);
    return this.joiningOnRefusal(
      volumes.map((v) => v.domain),
      opts.signal,
      () => this.holder.withLeases(leases, operationId, fn, call),
    );
  }

  /** The domain metadata lease: every metadata transaction of the domain runs under it. fn gets the lease (its lver: a fencing token). */
  withDomainLease<T>(domain: DomainRef, operationId: string, fn: (lease: pb.Lease) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.withLease(domain, DOMAIN_LEASE.resource, DOMAIN_LEASE.slot, 'exclusive', operationId, fn, { signal });
  }

  /**
   * The domain metadata lease without waiting: held by another → ABORTED (LEASE_HELD or
   * LEASE_HELD_ON_THIS_HOST). For a caller that polls at its own pace (metadata-tx's group
   * commit, so that hosts waiting for the lease catch the short gaps between holds). Refused
   * because another host holds it, the refusal also leaves a request for the lease in its area
   * (no force): a holder running a long group-commit hold reads it and ends the hold sooner.
   */
  tryDomainLease<T>(domain: DomainRef, operationId: string, fn: (lease: pb.Lease) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.withLease(domain, DOMAIN_LEASE.resource, DOMAIN_LEASE.slot, 'exclusive', operationId, fn, { signal, wait: false, requestIfHeld: true });
  }

  /** A volume's lease (resource = volume id) at its slot. */
  withVolumeLease<T>(
    domain: DomainRef,
    volumeId: string,
    slot: number,
    mode: LeaseMode,
    operationId: string,
    fn: () => Promise<T>,
    opts: { signal?: AbortSignal; wait?: boolean } = {},
  ): Promise<T> {
    return this.withLease(domain, volumeId, slot, mode, operationId, fn, opts);
  }

  /**
   * A volume's lease, exclusive and without waiting: for callers that already hold the
   * domain lease (a data job may hold the volume lease for minutes). Held → ABORTED.
   */
  tryVolumeLease<T>(domain: DomainRef, volumeId: string, slot: number, operationId: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.withLease(domain, volumeId, slot, 'exclusive', operationId, fn, { signal, wait: false });
  }

  /** The domain's GC lease, without waiting: only one host collects a domain at a time. */
  withGcLease<T>(domain: DomainRef, operationId: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.withLease(domain, GC_LEASE.resource, GC_LEASE.slot, 'exclusive', operationId, fn, { signal, wait: false });
  }

  static readonly SPM_LEASE = SPM_LEASE;

  /**
   * Takes the domain's SPM lease for this process and keeps it: it ends when the process
   * exits (or is fenced). Held elsewhere → ABORTED LEASE_HELD.
   */
  async holdSpmLease(domain: DomainRef, opts: CallOptions = {}): Promise<pb.Lease> {
    await this.ensureJoined(domain, opts);
    return this.holder.acquire(DomainLeases.location(domain, SPM_LEASE.resource, SPM_LEASE.slot), 'exclusive', 'spm', { ...opts, wait: false });
  }

  /**
   * Writes an empty resource lease at a slot (done inside the transaction that allocates it). Like
   * every format here, tried again across a restart of the lease-manager: writing the same empty
   * lease twice leaves what writing it once does.
   */
  async formatLeaseSlot(domain: DomainRef, resourceName: string, slot: number): Promise<void> {
    await untilLeaseManagerAnswers(
      (each) =>
        this.holder.leaseManager.formatLeases(
          { lockspace: domain.id, path: new DomainLayout(domain.path).leasesPath, leases: [DomainLeases.location(domain, resourceName, slot)] },
          each,
        ),
      {},
    );
  }

  /** Writes the domain's empty lockspace (ids) and its reserved leases (SDM, GC, SPM). */
  async formatDomainLeases(domain: DomainRef, ioTimeoutSeconds: number): Promise<void> {
    const layout = new DomainLayout(domain.path);
    await untilLeaseManagerAnswers(
      (each) => this.holder.leaseManager.formatLockspace({ lockspace: domain.id, path: layout.idsPath, ioTimeoutSeconds }, each),
      {},
    );
    await untilLeaseManagerAnswers(
      (each) =>
        this.holder.leaseManager.formatLeases(
          { lockspace: domain.id, path: layout.leasesPath, leases: RESERVED_LEASES.map((l) => DomainLeases.location(domain, l.resource, l.slot)) },
          each,
        ),
      {},
    );
  }
}

/** An acquire's call options: waiting unless told not to, until the signal aborts or DEFAULT_LEASE_WAIT_MS. */
function leaseCallOptions(opts: { signal?: AbortSignal; wait?: boolean }): CallOptions & { wait: boolean } {
  return { wait: opts.wait ?? true, signal: opts.signal, timeoutMs: opts.signal ? undefined : DEFAULT_LEASE_WAIT_MS };
}
