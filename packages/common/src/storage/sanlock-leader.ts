/**
 * sanlock's paxos leader record, read straight from storage: the first sector of a resource's
 * lease area. Readers use it as a cheap look (metadata-tx's waiters: is the domain lease free?
 * the lease-manager before a format: can this area have owners at all?); what sanlock decides
 * (acquire, owners) is still asked of sanlock.
 *
 * Fields used (sanlock's on-disk format, little-endian): magic (u32 at 0), num_hosts (u64 at
 * 16), owner host id (u64 at 32), lease version lver (u64 at 48), lockspace name (48 bytes at
 * 56), resource name (48 bytes at 104), timestamp (u64 at 152; 0 when the lease is free:
 * sanlock clears it on release). Read with O_DIRECT, so that what another host wrote reaches
 * this one through the storage, not a stale page cache.
 */
import { read } from 'node:fs';

const PAXOS_DISK_MAGIC = 0x06152010;
const LOCKSPACE_NAME_AT = 56;
const RESOURCE_NAME_AT = 104;
const NAME_LEN = 48;
/** A whole sector on 512- and 4096-byte sector storage (O_DIRECT reads whole, aligned sectors). */
export const LEADER_READ_BYTES = 4096;

export interface LeaderRecord {
  lockspace: string;
  resource: string;
  /** The owner's host id while held (0 when free). */
  ownerHostId: number;
  /** sanlock's lease version (bumped by every exclusive acquire). */
  lver: number;
  free: boolean;
  numHosts: number;
}

function nameAt(sector: Buffer, at: number): string {
  const name = sector.subarray(at, at + NAME_LEN);
  const end = name.indexOf(0);
  return name.subarray(0, end < 0 ? NAME_LEN : end).toString('latin1');
}

/** Parses a leader record; undefined if the sector is not one (never formatted, cleared, foreign). */
export function parseLeaderRecord(sector: Buffer): LeaderRecord | undefined {
  if (sector.length < 512 || sector.readUInt32LE(0) !== PAXOS_DISK_MAGIC) return undefined;
  const free = sector.readBigUInt64LE(152) === 0n;
  return {
    lockspace: nameAt(sector, LOCKSPACE_NAME_AT),
    resource: nameAt(sector, RESOURCE_NAME_AT),
    ownerHostId: free ? 0 : Number(sector.readBigUInt64LE(32)),
    lver: Number(sector.readBigUInt64LE(48)),
    free,
    numHosts: Number(sector.readBigUInt64LE(16)),
  };
}

/**
 * O_DIRECT needs a buffer aligned to the sector size: WebAssembly memory is page-aligned by
 * construction (a Buffer from the heap is not). One page of it, shared by the reads of this
 * process, which take turns.
 */
const { WebAssembly: wasm } = globalThis as unknown as { WebAssembly: { Memory: new (desc: { initial: number }) => { buffer: ArrayBuffer } } };
let alignedPage: Buffer | undefined;
let turn: Promise<unknown> = Promise.resolve();

/** Reads the leader sector at offset through fd (opened with O_DIRECT); a copy of what was read. */
export function readLeaderSector(fd: number, offset: number): Promise<Buffer> {
  alignedPage ??= Buffer.from(new wasm.Memory({ initial: 1 }).buffer, 0, LEADER_READ_BYTES);
  const page = alignedPage;
  const mine = turn.then(
    () =>
      new Promise<Buffer>((resolve, reject) =>
        read(fd, page, 0, LEADER_READ_BYTES, offset, (err, n) => (err ? reject(err) : resolve(Buffer.from(page.subarray(0, n))))),
      ),
  );
  turn = mine.catch(() => undefined);
  return mine;
}
