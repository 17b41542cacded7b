/**
 * A look at a domain's metadata lease as sanlock wrote it on storage, for a host waiting for the
 * lease: it learns that the holder released it (or that another waiter took it) from one small
 * direct read of the lease's leader record, in this process, instead of asking the lease-manager
 * for the lease over and over. It is a hint and nothing more: who holds the lease is decided by
 * sanlock's acquire alone, and a look that fails, or misreads, costs at most the poll it replaced.
 *
 * The leader record is the first sector of the lease area (slot 0 of dom_md/leases), read with
 * O_DIRECT and parsed by @sdmesh/common's sanlock-leader.ts.
 */
import { constants as fsc, close } from 'node:fs';
import { ConfinedRoot, DOMAIN_LEASE, DomainLayout, leaseOffset, parseLeaderRecord, readLeaderSector } from '@sdmesh/common';
import type { DomainRef } from './leases';

/** What a look saw: whether the lease is free, and its version. */
export interface LeaseLook {
  free: boolean;
  /** sanlock's lease version (bumped by every exclusive acquire). */
  lver: number;
  /** The owner's host id while held (0 when free). */
  ownerHostId: number;
}

/** Parses a leader record; undefined unless it is the named resource's. */
export function parseLeader(sector: Buffer, resource: string): LeaseLook | undefined {
  const leader = parseLeaderRecord(sector);
  if (!leader || leader.resource !== resource) return undefined;
  return { free: leader.free, lver: leader.lver, ownerHostId: leader.ownerHostId };
}

/** Looks at a domain's metadata lease on storage; undefined when it cannot be read or is not a sanlock lease. */
export async function lookAtDomainLease(domain: DomainRef): Promise<LeaseLook | undefined> {
  let fd: number | undefined;
  try {
    fd = await new ConfinedRoot(domain.path).openFd(new DomainLayout(domain.path).leasesPath, fsc.O_RDONLY | fsc.O_DIRECT);
    return parseLeader(await readLeaderSector(fd, leaseOffset(DOMAIN_LEASE.slot)), DOMAIN_LEASE.resource);
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) close(fd, () => undefined);
  }
}
