import { internal } from './errors';
import type { LeaseMode } from './lease-holder';
import { Reason } from './reasons';

/**
 * One sanlock lease an operation needs, as data: which lease (lockspace, resource), in which
 * mode, and how to hold it. `hold` takes the lease, runs body, and releases the lease when body
 * settles (DomainLeases.withVolumeLease and friends have that shape); waiting or not, signals
 * and error mapping are the caller's choice and live in `hold`.
 */
export interface LeaseClaim {
  lockspace: string;
  resource: string;
  mode: LeaseMode;
  hold(body: () => Promise<void>): Promise<void>;
}

/**
 * The one order in which sdmesh takes sanlock leases: by lockspace, then resource, comparing
 * UTF-16 code units (not localeCompare, whose order depends on the process's locale: two hosts
 * must agree). Two operations that take their leases in this order can't wait on each other
 * in a cycle.
 */
export function compareLeaseKeys(a: { lockspace: string; resource: string }, b: { lockspace: string; resource: string }): number {
  if (a.lockspace !== b.lockspace) return a.lockspace < b.lockspace ? -1 : 1;
  if (a.resource !== b.resource) return a.resource < b.resource ? -1 : 1;
  return 0;
}

/**
 * The claims in lease order, each lease once. One lease asked for twice in the same mode is
 * taken once; in two modes it is refused (INTERNAL LEASE_MODE_CONFLICT) before any lease is
 * taken: sanlock lets a process hold a resource once, and quietly picking one mode would give
 * one of the two callers less protection than it asked for.
 */
export function orderLeaseClaims<C extends LeaseClaim>(claims: readonly C[]): C[] {
  const sorted = [...claims].sort(compareLeaseKeys);
  const ordered: C[] = [];
  for (const claim of sorted) {
    const previous = ordered[ordered.length - 1];
    if (previous && compareLeaseKeys(previous, claim) === 0) {
      if (previous.mode !== claim.mode) {
        throw internal(
          `lease "${claim.resource}" of lockspace "${claim.lockspace}" was asked for both ${previous.mode} and ${claim.mode}: refused`,
          Reason.LEASE_MODE_CONFLICT,
        );
      }
      continue;
    }
    ordered.push(claim);
  }
  return ordered;
}

/**
 * Runs fn while holding every claimed lease: deduplicated, taken in lease order
 * (compareLeaseKeys), released in reverse order when fn settles. If taking one fails, the
 * leases already held are released, in reverse order, and the error is thrown (fn never runs).
 * In the style of vdsm's guarded.context.
 */
export async function holdLeasesInOrder<T>(claims: readonly LeaseClaim[], fn: () => Promise<T>): Promise<T> {
  const ordered = orderLeaseClaims(claims);
  let result: { value: T } | undefined;
  // Nesting the holds releases each lease after every lease taken inside it.
  const holdFrom = async (i: number): Promise<void> => {
    const claim = ordered[i];
    if (!claim) {
      result = { value: await fn() };
      return;
    }
    await claim.hold(() => holdFrom(i + 1));
  };
  await holdFrom(0);
  if (!result) throw internal('a lease holder returned without running the operation under its lease');
  return result.value;
}
