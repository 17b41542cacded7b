import { aborted, type DomainRef } from '@sdmesh/common';
import type { GcLeaseProvider } from '../../services/gc/src/collector';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';

/**
 * Unit-test stand-in for the GC's leases: the domain metadata lease is the same in-process
 * mutex metadata-tx's InProcessDomainLeaseProvider uses (so an engine and a GC in one test
 * really exclude each other); the GC lease and volume leases can be marked "held elsewhere".
 */
export class FakeGcLeases implements GcLeaseProvider {
  readonly domainLeases = new InProcessDomainLeaseProvider();
  /** Domain ids whose GC lease another host holds. */
  readonly gcHeldElsewhere = new Set<string>();
  /** Volume ids whose lease another host holds. */
  readonly volumesHeldElsewhere = new Set<string>();
  /** Called each time the domain lease is granted, before the GC's batch runs. */
  onDomainLease?: () => Promise<void> | void;
  readonly log: string[] = [];
  private readonly heldVolumes = new Set<string>();

  async withGcLease<T>(domain: DomainRef, _op: string, fn: () => Promise<T>): Promise<T> {
    if (this.gcHeldElsewhere.has(domain.id)) throw aborted(`lease "GC" of lockspace "${domain.id}" is held (exclusive) by host id 9`, 'LEASE_HELD');
    this.log.push('gc+');
    try {
      return await fn();
    } finally {
      this.log.push('gc-');
    }
  }

  /** The domain lease's version per domain id, bumped by every grant as sanlock does (otherHolder: another holder's grant). */
  readonly lver = new Map<string, number>();
  otherHolder(domainId: string): void {
    this.lver.set(domainId, (this.lver.get(domainId) ?? 0) + 1);
  }

  withDomainLease<T>(domain: DomainRef, op: string, fn: (lease: { lver?: number }) => Promise<T>, signal?: AbortSignal): Promise<T> {
    return this.domainLeases.withDomainLease(
      domain,
      op,
      async () => {
        this.otherHolder(domain.id);
        this.log.push('sdm+');
        try {
          await this.onDomainLease?.();
          return await fn({ lver: this.lver.get(domain.id) });
        } finally {
          this.log.push('sdm-');
        }
      },
      signal,
    );
  }

  async withVolumeLease<T>(
    _domain: DomainRef,
    volumeId: string,
    slot: number,
    _mode: 'exclusive',
    _op: string,
    fn: () => Promise<T>,
    opts: { wait?: boolean },
  ): Promise<T> {
    if (opts.wait !== false) throw new Error('the GC must never wait for a volume lease');
    if (this.volumesHeldElsewhere.has(volumeId) || this.heldVolumes.has(volumeId))
      throw aborted(`lease "${volumeId}" is held (exclusive) by host id 9`, 'LEASE_HELD');
    this.heldVolumes.add(volumeId);
    this.log.push(`vol+${slot}`);
    try {
      return await fn();
    } finally {
      this.heldVolumes.delete(volumeId);
      this.log.push(`vol-${slot}`);
    }
  }

  async leaseOwners(_domain: DomainRef, resource: string): Promise<number[]> {
    return this.volumesHeldElsewhere.has(resource) ? [9] : [];
  }
}
