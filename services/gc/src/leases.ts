import { brokenForTest, DomainLeases, isLeaseHeldByAnother, retry, type LeaseHolder, type RetryPolicy } from '@sdmesh/common';
import type { GcLeaseProvider } from './items';
import { holdVolumesWith, VolumeLeaseGroups } from './lease-groups';
import type { LeaseWorkers } from './lease-workers';

/** Waiting for the domain lease: a try every 16–24 ms, for as long as a transaction would wait (the lease-manager's default). */
const DOMAIN_LEASE_POLL: RetryPolicy = { totalMs: 120_000, initialBackoffMs: 20, maxBackoffMs: 20, retryable: isLeaseHeldByAnother };

/**
 * The GC's leases as deployed: every lease through this host's lease-manager for this process
 * (a registered LeaseHolder), so sanlock fences the process if the host loses a lockspace and its
 * leases die with it. Volume leases go several per sanlock acquire (VolumeLeaseGroups), held by the
 * lease worker processes when there are `workers`. Also what `bench/gc-collect.ts` measures.
 */
export function sanlockLeases(holder: LeaseHolder, workers?: LeaseWorkers): GcLeaseProvider {
  const domainLeases = new DomainLeases(holder);
  const lm = holder.leaseManager;
  const inProcess = holdVolumesWith(domainLeases);
  // Several volume leases per sanlock command: a group per lease worker at a time, or in this process.
  const volumeGroups = workers
    ? new VolumeLeaseGroups((d, volumes, op, body) => workers.holdVolumes(d, volumes, op, body), workers.count)
    : new VolumeLeaseGroups(inProcess, 2);
  return {
    withGcLease: (d, op, fn, signal) => domainLeases.withGcLease(d, op, fn, signal),
    // The negative control of the chaos checker (docs/chaos.md): on only with SDMESH_CHAOS_TEST=1 as well.
    withDomainLease: async (d, op, fn, signal) => {
      if (brokenForTest('gc-without-domain-lease')) return fn({});
      // Tried without waiting, every ~20 ms: the lease-manager's own wait backs off to 1 s between
      // tries and rarely catches the short gaps between the holds of a host that keeps creating
      // (bench/gc-collect.ts `creates`: 657 ms per batch's acquire beside a create every 50 ms).
      let granted = false;
      const batch = (lease: { lver?: number }) => {
        granted = true;
        return fn(lease);
      };
      return retry(
        { ...DOMAIN_LEASE_POLL, retryable: (err) => !granted && isLeaseHeldByAnother(err) },
        () => domainLeases.tryDomainLease(d, op, batch, signal),
        { signal },
      );
    },
    withVolumeLease: (d, vol, slot, mode, op, fn, opts) =>
      mode === 'exclusive' && opts.wait === false
        ? volumeGroups.withVolumeLease(d, vol, slot, op, fn)
        : domainLeases.withVolumeLease(d, vol, slot, mode, op, fn, opts),
    leaseOwners: async (d, resource, slot) => (await lm.getLeaseOwner({ lease: DomainLeases.location(d, resource, slot) }, { timeoutMs: 5000 })).ownerHostIds,
  };
}
