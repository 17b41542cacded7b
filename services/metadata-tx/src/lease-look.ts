/**
 * A look at a domain's metadata lease as sanlock wrote it on storage, for a host waiting for the
 * lease: it learns that the holder released it (or that another waiter took it) from one small
 * direct read of the lease's leader record, in this process, instead of asking the lease-manager
 * for the lease over and over. It is a hint and nothing more: who holds the lease is decided by
 * sanlock's acquire alone, and a look that fails, or misreads, costs at most the poll it replaced.
 *
 * The leader record is the first sector of the lease area (slot 0 of dom_md/leases), read with
 * O_DIRECT and parsed by @sdmesh/common's sanlock-leader.ts.
 *
 * The other way round, the holder reads the request record that follows the leader (written by
 * sanlock when a waiting host's try was refused: AcquireLease request_if_held) to learn that
 * another host wants the lease (isDomainLeaseWanted). Also only a hint: it can end a hold
 * sooner, never start one or make one longer.
 */
import { constants as fsc, close } from 'node:fs';
import { ConfinedRoot, DOMAIN_LEASE, DomainLayout, LEADER_READ_BYTES, leaseOffset, parseLeaderRecord, readLeaderSector } from '@sdmesh/common';
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

/**
 * sanlock's request record: the sector after the leader (sanlock_request writes it; sanlock's
 * on-disk format, little-endian): magic (u32 at 0), version (u32 at 4, major in the high half),
 * the requested lease version (u64 at 8), force mode (u32 at 16).
 */
const REQUEST_MAGIC = 0x08292011;
const REQUEST_VERSION_MAJOR = 0x00010000;
/** The leader's sector size (u32 at 12): where the request record starts. */
const LEADER_SECTOR_SIZE_AT = 12;

/** The lease version a request record asks for; undefined unless the bytes are one. */
export function parseRequestRecord(sector: Buffer): number | undefined {
  if (sector.length < 24 || sector.readUInt32LE(0) !== REQUEST_MAGIC) return undefined;
  if ((sector.readUInt32LE(4) & 0xffff0000) >>> 0 !== REQUEST_VERSION_MAJOR) return undefined;
  const lver = sector.readBigUInt64LE(8);
  return lver > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(lver);
}

/**
 * Whether the lease area, read while this process holds the lease at version lver, shows that
 * another host wants it: its request record asks for version lver or later. sanlock_request
 * asks for the version after the one on storage, so a request made during this hold asks for
 * lver + 1, and one made during this process's previous hold or the gap after it (the leader
 * still at lver - 1) asks for lver itself: a host that wanted the lease and saw this process
 * take it again. A stale request (its host gave up) costs one shorter hold. The bytes are
 * hostile input: anything but the named resource's leader at lver, held, with a well-formed
 * request record after it, is "not known" (false), which keeps the hold as it was.
 */
export function parseLeaseWanted(area: Buffer, resource: string, lver: number): boolean {
  const leader = parseLeader(area, resource);
  if (!leader || leader.free || lver <= 0 || leader.lver !== lver) return false;
  const sectorSize = area.readUInt32LE(LEADER_SECTOR_SIZE_AT);
  if (sectorSize !== 512 && sectorSize !== 4096) return false;
  if (area.length < sectorSize * 2) return false;
  const requested = parseRequestRecord(area.subarray(sectorSize, sectorSize * 2));
  return requested !== undefined && requested >= lver;
}

/**
 * Reads the domain lease's leader and request record (one O_DIRECT read of the area's first
 * 4 KiB, a second one on 4096-byte-sector storage, where the request record is the next 4 KiB)
 * and tells whether another host wants the lease this process holds at lver (parseLeaseWanted);
 * undefined when the area cannot be read.
 */
export async function isDomainLeaseWanted(domain: DomainRef, lver: number): Promise<boolean | undefined> {
  let fd: number | undefined;
  try {
    fd = await new ConfinedRoot(domain.path).openFd(new DomainLayout(domain.path).leasesPath, fsc.O_RDONLY | fsc.O_DIRECT);
    const at = leaseOffset(DOMAIN_LEASE.slot);
    let area = await readLeaderSector(fd, at);
    if (area.length >= 512 && area.readUInt32LE(LEADER_SECTOR_SIZE_AT) === LEADER_READ_BYTES && area.length === LEADER_READ_BYTES) {
      area = Buffer.concat([area, await readLeaderSector(fd, at + LEADER_READ_BYTES)]);
    }
    return parseLeaseWanted(area, DOMAIN_LEASE.resource, lver);
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) close(fd, () => undefined);
  }
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
