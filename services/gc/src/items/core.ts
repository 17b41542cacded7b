/**
 * The shared core of the GC's item kinds: how one item is removed (never recursively, files
 * sdmesh named only), how an item is left for a later pass (Skip), and how a record that
 * claims a lease slot is removed under that volume's lease.
 */
import path from 'node:path';
import {
  classifyVolumeEntry,
  ConfinedRoot,
  fail,
  GrpcStatus,
  holdLeasesInOrder,
  ioError,
  isLeaseHeldByAnother,
  readVolumeRecord,
  Reason,
  SdmeshError,
  type DomainRef,
  type GarbageItem,
  type GarbageKind,
} from '@sdmesh/common';
import type { GcFaultInjector } from '../faults';

/** The leases the GC takes (DomainLeases implements it; unit tests use a fake). */
export interface GcLeaseProvider {
  /** The domain's GC lease, without waiting: ABORTED LEASE_HELD if another host has it. */
  withGcLease<T>(domain: DomainRef, operationId: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * The domain metadata lease (waits): no transaction is in flight on the domain while it is
   * held. fn gets the lease's version (sanlock's lver; absent when the provider has none).
   */
  withDomainLease<T>(domain: DomainRef, operationId: string, fn: (lease: { lver?: number }) => Promise<T>, signal?: AbortSignal): Promise<T>;
  withVolumeLease<T>(
    domain: DomainRef,
    volumeId: string,
    slot: number,
    mode: 'exclusive',
    operationId: string,
    fn: () => Promise<T>,
    opts: { signal?: AbortSignal; wait?: boolean },
  ): Promise<T>;
  /** Host ids holding a lease now, for the dry run only (optional; errors are ignored). */
  leaseOwners?(domain: DomainRef, resource: string, slot: number): Promise<number[]>;
}

export type SkipReason = 'grace' | 'lease_held' | 'error' | 'gone';

/** Thrown inside an item's removal when it must be left for a later pass. */
export class Skip extends Error {
  constructor(
    readonly reason: SkipReason,
    message: string,
  ) {
    super(message);
  }
}

/** What an item kind's removal may use: the domain, the pass's leases and its bookkeeping. */
export interface ItemContext {
  domain: DomainRef;
  dom: ConfinedRoot;
  leases: GcLeaseProvider;
  faults: GcFaultInjector;
  operationId: string;
  signal?: AbortSignal;
  /**
   * Another item of this pass removed along with the current one (a deleted volume's data
   * next to its record): reported as itself. False if it is not an open item of the pass.
   */
  removedAlongside(relativePath: string, bytes: number): boolean;
  /**
   * Makes this directory's changes durable before the current batch ends: the collector fsyncs
   * each changed directory once per batch, and before it releases the domain lease (so a slot
   * freed here is durably free before any create can take it again). A crash before that may
   * bring back some removed names: they are still garbage by name, and the next pass removes them.
   */
  syncDir(dir: string): void;
  /**
   * The names of a directory, listed once per batch (nothing else changes a domain's directories
   * while the GC holds the domain lease; a name this batch removed meanwhile is just gone).
   */
  listOnce(dir: string): Promise<string[]>;
}

/** One removal step of a kind; returns the bytes it freed. */
export type RemoveItem = (ctx: ItemContext, item: GarbageItem) => Promise<number>;

/**
 * How one kind of garbage is removed. A pass first runs every `withoutDomainLease` step (data
 * nothing refers to), then the `underDomainLease` steps in short batches, by `rank`: data
 * before the records that claim lease slots.
 */
export interface ItemKind {
  kind: GarbageKind;
  withoutDomainLease?: { remove: RemoveItem; /** The item is done after this step. */ final: boolean };
  rank: number;
  underDomainLease: RemoveItem;
}

export const fullPath = (ctx: ItemContext, item: GarbageItem) => path.join(ctx.domain.path, item.relativePath);

export const isRecordEntry = (name: string) => {
  const kind = classifyVolumeEntry(name).kind;
  return kind === 'meta' || kind === 'meta-tx' || kind === 'deleted-meta';
};

/**
 * Removes one file sdmesh named (never a directory, never recursively: a symlink, FIFO or
 * device at that name is left and reported); returns its allocated bytes, 0 if already gone.
 */
export async function removeFile(dom: ConfinedRoot, p: string): Promise<number> {
  const st = await dom.lstat(p);
  if (!st) return 0;
  if (!st.isFile())
    throw fail(
      st.isSymbolicLink() ? Reason.SYMLINK_REFUSED : Reason.UNEXPECTED_FILE_TYPE,
      `${dom.relative(p)} is ${st.isSymbolicLink() ? 'a symbolic link' : 'not a regular file'}: not removed, left for an operator`,
    );
  try {
    await dom.unlink(p);
  } catch (err) {
    if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return 0;
    throw err;
  }
  return st.blocks * 512;
}

/** removeFile, its directory made durable with the batch (ItemContext.syncDir). */
export async function removeFileDurably(ctx: ItemContext, p: string): Promise<number> {
  const bytes = await removeFile(ctx.dom, p);
  ctx.syncDir(path.dirname(p));
  return bytes;
}

/** Regular files of a garbage directory whose names sdmesh writes; anything else is left alone. */
export async function readDirOrGone(dom: ConfinedRoot, dir: string): Promise<string[]> {
  try {
    return (await dom.list(dir, ['file'])).entries.map((e) => e.name).filter((n) => classifyVolumeEntry(n).kind !== 'foreign');
  } catch (err) {
    const e = SdmeshError.from(err);
    if (e.code === GrpcStatus.NOT_FOUND) throw new Skip('gone', `${dir} is gone`);
    throw e;
  }
}

/** Removes every entry of an image directory that is not a volume record; returns bytes. */
export async function removeDataFiles(ctx: ItemContext, dir: string): Promise<number> {
  let bytes = 0;
  for (const name of await readDirOrGone(ctx.dom, dir)) if (!isRecordEntry(name)) bytes += await removeFile(ctx.dom, path.join(dir, name));
  ctx.syncDir(dir);
  return bytes;
}

/** rmdir of an emptied garbage directory; entries sdmesh did not make keep it (for an operator). */
export async function removeDir(ctx: ItemContext, dir: string): Promise<void> {
  const { dom } = ctx;
  try {
    await dom.rmdir(dir);
  } catch (err) {
    const e = SdmeshError.from(err);
    if (e.code === GrpcStatus.ALREADY_EXISTS) {
      throw fail(Reason.UNEXPECTED_ENTRIES, `${dom.relative(dir)} still holds entries sdmesh did not create (or of an unexpected type): left for an operator`);
    }
    if (e.code !== GrpcStatus.NOT_FOUND) throw e;
  }
  ctx.syncDir(path.dirname(dir));
}

/** A record's volume and slot; gone → Skip, unreadable → an error naming why it is left. */
export async function readRecordOrSkip(domain: DomainRef, file: string) {
  try {
    return await readVolumeRecord(file, undefined, new ConfinedRoot(domain.path));
  } catch (err) {
    const e = ioError(err, file);
    if (e.code === GrpcStatus.NOT_FOUND) throw new Skip('gone', `${file} is gone`);
    throw new SdmeshError(
      e.code,
      `${path.relative(domain.path, file)} is unreadable (${e.message}): its lease slot is unknown, so it is left for an operator`,
      e.reason,
    );
  }
}

/**
 * Holds the volume's lease without waiting: a holder may be a data job still using the
 * deleted volume (skip it this time). Never waiting while holding the domain lease also
 * keeps the GC out of a deadlock with a job that holds the volume lease and waits for the
 * domain lease.
 */
export function underVolumeLease(ctx: ItemContext, record: { volumeId: string; leaseSlot: number }, fn: () => Promise<number>): Promise<number> {
  const { domain, operationId, signal } = ctx;
  return holdLeasesInOrder(
    [
      {
        lockspace: domain.id,
        resource: record.volumeId,
        mode: 'exclusive',
        hold: async (body) => {
          try {
            await ctx.leases.withVolumeLease(domain, record.volumeId, record.leaseSlot, 'exclusive', operationId, body, { signal, wait: false });
          } catch (err) {
            if (isLeaseHeldByAnother(err))
              throw new Skip('lease_held', `lease of volume ${record.volumeId} (slot ${record.leaseSlot}) is held: ${SdmeshError.from(err).message}`);
            throw err;
          }
        },
      },
    ],
    fn,
  );
}

/** A committed (now deleted) record: removed only under its volume lease. */
export async function removeRecordUnderVolumeLease(ctx: ItemContext, file: string): Promise<number> {
  const record = await readRecordOrSkip(ctx.domain, file);
  return underVolumeLease(ctx, record, () => removeFileDurably(ctx, file));
}
