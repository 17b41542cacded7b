/**
 * A look at a domain's metadata lease as sanlock wrote it on storage, for a host waiting for the
 * lease: it learns that the holder released it (or that another waiter took it) from one small
 * direct read of the lease's leader record, in this process, instead of asking the lease-manager
 * for the lease over and over. It is a hint and nothing more: who holds the lease is decided by
 * sanlock's acquire alone, and a look that fails, or misreads, costs at most the poll it replaced.
 *
 * The leader record is the first sector of the lease area (slot 0 of dom_md/leases). Fields used
 * (sanlock's on-disk format, little-endian): magic (u32 at 0), owner host id (u64 at 32), lease
 * version lver (u64 at 48), resource name (48 bytes at 104), timestamp (u64 at 152; 0 when the
 * lease is free: sanlock clears it on release). Read with O_DIRECT, so that a release written by
 * another host reaches this one through the storage, not a stale page cache.
 */
import { constants as fsc, read, close } from 'node:fs';
import { ConfinedRoot, DOMAIN_LEASE, DomainLayout, leaseOffset } from '@sdmesh/common';
import type { DomainRef } from './leases';

/** What a look saw: whether the lease is free, and its version. */
export interface LeaseLook {
  free: boolean;
  /** sanlock's lease version (bumped by every exclusive acquire). */
  lver: number;
  /** The owner's host id while held (0 when free). */
  ownerHostId: number;
}

const PAXOS_DISK_MAGIC = 0x06152010;
/** A whole sector on 512- and 4096-byte sector storage (O_DIRECT reads whole, aligned sectors). */
const LEADER_READ_BYTES = 4096;
const RESOURCE_NAME_AT = 104;
const NAME_LEN = 48;

/**
 * O_DIRECT needs a buffer aligned to the sector size: WebAssembly memory is page-aligned by
 * construction (a Buffer from the heap is not). One page of it, shared by the looks of this
 * process, which take turns.
 */
const { WebAssembly: wasm } = globalThis as unknown as { WebAssembly: { Memory: new (desc: { initial: number }) => { buffer: ArrayBuffer } } };
let alignedPage: Buffer | undefined;
let turn: Promise<unknown> = Promise.resolve();

function readDirect(fd: number): Promise<Buffer> {
  alignedPage ??= Buffer.from(new wasm.Memory({ initial: 1 }).buffer, 0, LEADER_READ_BYTES);
  const page = alignedPage;
  const mine = turn.then(
    () =>
      new Promise<Buffer>((resolve, reject) =>
        read(fd, page, 0, LEADER_READ_BYTES, leaseOffset(DOMAIN_LEASE.slot), (err, n) => (err ? reject(err) : resolve(Buffer.from(page.subarray(0, n))))),
      ),
  );
  turn = mine.catch(() => undefined);
  return mine;
}

/** Parses a leader record; undefined unless it is the named resource's. */
export function parseLeader(sector: Buffer, resource: string): LeaseLook | undefined {
  if (sector.length < 512 || sector.readUInt32LE(0) !== PAXOS_DISK_MAGIC) return undefined;
  const name = sector.subarray(RESOURCE_NAME_AT, RESOURCE_NAME_AT + NAME_LEN);
  const end = name.indexOf(0);
  if (name.subarray(0, end < 0 ? NAME_LEN : end).toString('latin1') !== resource) return undefined;
  const timestamp = sector.readBigUInt64LE(152);
  const owner = Number(sector.readBigUInt64LE(32));
  return { free: timestamp === 0n, lver: Number(sector.readBigUInt64LE(48)), ownerHostId: timestamp === 0n ? 0 : owner };
}

/** Looks at a domain's metadata lease on storage; undefined when it cannot be read or is not a sanlock lease. */
export async function lookAtDomainLease(domain: DomainRef): Promise<LeaseLook | undefined> {
  let fd: number | undefined;
  try {
    fd = await new ConfinedRoot(domain.path).openFd(new DomainLayout(domain.path).leasesPath, fsc.O_RDONLY | fsc.O_DIRECT);
    return parseLeader(await readDirect(fd), DOMAIN_LEASE.resource);
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) close(fd, () => undefined);
  }
}
