import { brokenForTest, DomainLeases, isLeaseHeldByAnother, retry, type LeaseHolder, type RetryPolicy } from '@sdmesh/common';
import type { GcLeaseProvider } from './items';
import { holdVolumesWith, VolumeLeaseGroups } from './lease-groups';
import type { LeaseWorkers } from './lease-workers';

/**
 * One sanlock command at a time for this process. sanlock runs one command per registered
 * client (pid) and refuses a second one meanwhile with EBUSY, and this process's leases are
 * acquired by the lease-manager for its pid while it releases them itself on its own
 * connection: with items removed in parallel, an acquire overlapping another item's release
 * was refused (the item skipped as if its lease were held) or the release was (the lease then
 * went back through the lease-manager, or stayed held until the process exited). Measured in
 * `bench/gc-collect.ts`: 32 of 200 volume leases refused before this gate.
 */
class SanlockGate {
  private tail: Promise<void> = Promise.resolve();

  /** Waits for the gate; returns the function that opens it again (call it once). */
  async enter(): Promise<() => void> {
    let open!: () => void;
    const next = new Promise<void>((resolve) => (open = resolve));
    const previous = this.tail;
    this.tail = previous.then(() => next);
    await previous;
    return open;
  }

  /**
   * Holds a lease through `hold` with its acquire and its release inside the gate, and fn
   * (the work under the lease) outside it, so the work of parallel items overlaps.
   */
  async around<A extends unknown[], T>(hold: (body: (...lease: A) => Promise<T>) => Promise<T>, fn: (...lease: A) => Promise<T>): Promise<T> {
    let open = await this.enter();
    try {
      return await hold(async (...lease) => {
        open();
        try {
          return await fn(...lease);
        } finally {
          open = await this.enter();
        }
      });
    } finally {
      open();
    }
  }
}

/**
 * The GC's leases as deployed: every lease through this host's lease-manager for this process
 * (a registered LeaseHolder), so sanlock fences the process if the host loses a lockspace and
 * its leases die with it. With `workers`, the volume leases of parallel items are held by lease
 * worker processes instead, so they are taken in parallel. Also what `bench/gc-collect.ts` measures.
 */
/** Waiting for the domain lease: a try every 16–24 ms, for as long as a transaction would wait (the lease-manager's default). */
const DOMAIN_LEASE_POLL: RetryPolicy = { totalMs: 120_000, initialBackoffMs: 20, maxBackoffMs: 20, retryable: isLeaseHeldByAnother };

export function sanlockLeases(holder: LeaseHolder, workers?: LeaseWorkers): GcLeaseProvider {
  const domainLeases = new DomainLeases(holder);
  const lm = holder.leaseManager;
  const gate = new SanlockGate();
  const inProcess = holdVolumesWith(domainLeases);
  // Several volume leases per sanlock command: a group per lease worker at a time, or in this process.
  const volumeGroups = workers
    ? new VolumeLeaseGroups((d, volumes, op, body) => workers.holdVolumes(d, volumes, op, body), workers.count)
    : new VolumeLeaseGroups((d, volumes, op, body) => gate.around((hold) => inProcess(d, volumes, op, hold), body), 2);
  return {
    withGcLease: (d, op, fn, signal) => gate.around((body) => domainLeases.withGcLease(d, op, body, signal), fn),
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
        () => gate.around((body) => domainLeases.tryDomainLease(d, op, body, signal), batch),
        { signal },
      );
    },
    withVolumeLease: (d, vol, slot, mode, op, fn, opts) =>
      mode === 'exclusive' && opts.wait === false
        ? volumeGroups.withVolumeLease(d, vol, slot, op, fn)
        : gate.around((body) => domainLeases.withVolumeLease(d, vol, slot, mode, op, body, opts), fn),
    leaseOwners: async (d, resource, slot) => (await lm.getLeaseOwner({ lease: DomainLeases.location(d, resource, slot) }, { timeoutMs: 5000 })).ownerHostIds,
  };
}
