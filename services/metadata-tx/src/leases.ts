import fs from 'node:fs/promises';
import { aborted as abortedError, SdmeshError, type DomainRef, Reason } from '@sdmesh/common';
import { ConfinedRoot } from '@sdmesh/common';
import { DomainLayout, IDS_FILE_SIZE, leaseOffset, RESERVED_LEASES } from '@sdmesh/common';

export type { DomainRef };

/** What a domain lease holder learns of its hold. */
export interface DomainLeaseHold {
  /**
   * sanlock's lease version after the acquire (a fencing token: it grows by one on every
   * exclusive acquire by anyone); absent or 0 when the provider has none. The next hold of this
   * process proves nobody else held the lease in between iff its lver is this one + 1.
   */
  lver?: number;
}

/**
 * What metadata-tx needs of the lease layer. The real implementation talks to the host's
 * lease-manager (sanlock); InProcessDomainLeaseProvider serves unit tests and single-process mode.
 */
export interface DomainLeaseProvider {
  /**
   * Holds the domain metadata lease (slot 0 of dom_md/leases, resource "SDM", exclusive) while
   * fn runs, and releases it afterwards even if fn throws. Waits while another holder has it,
   * until signal aborts (then rejects with the signal's reason or CANCELLED). If the lease is
   * lost while fn runs, the holder process must be stopped (sanlock does this) — fn is not told.
   */
  withDomainLease<T>(domain: DomainRef, operationId: string, fn: (hold: DomainLeaseHold) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * The domain lease without waiting (held elsewhere → ABORTED LEASE_HELD or
   * LEASE_HELD_ON_THIS_HOST), for a caller that polls at its own pace; optional.
   */
  tryDomainLease?<T>(domain: DomainRef, operationId: string, fn: (hold: DomainLeaseHold) => Promise<T>, signal?: AbortSignal): Promise<T>;
  /**
   * Holds a volume's lease (resource = volume id, at its slot) exclusively while fn runs,
   * WITHOUT waiting: metadata-tx calls it while holding the domain lease, and a data job may
   * hold the volume lease for minutes; waiting would stall every transaction of the domain.
   * A held lease rejects with ABORTED (reason LEASE_HELD or LEASE_HELD_ON_THIS_HOST).
   */
  tryVolumeLease<T>(domain: DomainRef, volumeId: string, slot: number, operationId: string, fn: () => Promise<T>, signal?: AbortSignal): Promise<T>;
  /** Writes an empty sanlock resource lease named resourceName at slot (offset slot × 1 MiB of dom_md/leases). */
  formatLeaseSlot(domain: DomainRef, resourceName: string, slot: number): Promise<void>;
  /** Creates dom_md/ids (empty lockspace) and dom_md/leases with the SDM, GC and SPM leases (slots 0-2). */
  formatDomainLeases(domain: DomainRef, ioTimeoutSeconds: number): Promise<void>;
}

/** A FIFO async mutex; waiting can be abandoned through an AbortSignal. */
class AsyncMutex {
  private queue: Array<() => void> = [];
  private locked = false;

  async acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) throw SdmeshError.from(signal.reason ?? abortedError('cancelled while waiting for the domain lease'));
    if (!this.locked) {
      this.locked = true;
      return () => this.release();
    }
    return new Promise((resolve, reject) => {
      const grant = () => {
        signal?.removeEventListener('abort', onAbort);
        resolve(() => this.release());
      };
      const onAbort = () => {
        this.queue = this.queue.filter((g) => g !== grant);
        reject(SdmeshError.from(signal?.reason ?? abortedError('cancelled while waiting for the domain lease')));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.queue.push(grant);
    });
  }

  private release(): void {
    const next = this.queue.shift();
    if (next) next();
    else this.locked = false;
  }
}

/**
 * Single-process stand-in for the domain lease: a per-domain mutex. Safe only when this one
 * process is the only writer of the domain (unit tests, a one-host lab). Formatting creates
 * zero-filled (sparse) files of the right sizes, which sanlock would reject: it is not a
 * substitute for real leases on shared storage.
 */
export class InProcessDomainLeaseProvider implements DomainLeaseProvider {
  private readonly mutexes = new Map<string, AsyncMutex>();
  /** Slots formatted per domain id (for tests). */
  readonly formattedSlots = new Map<string, Map<number, string>>();

  /** No fencing token: other processes may write the domain between two holds unseen. */
  async withDomainLease<T>(domain: DomainRef, _operationId: string, fn: (hold: DomainLeaseHold) => Promise<T>, signal?: AbortSignal): Promise<T> {
    let mutex = this.mutexes.get(domain.id);
    if (!mutex) this.mutexes.set(domain.id, (mutex = new AsyncMutex()));
    const release = await mutex.acquire(signal);
    try {
      return await fn({});
    } finally {
      release();
    }
  }

  /** Volume "leases" in one process: a try-lock per volume, refused (never waited for) when held. */
  private readonly heldVolumes = new Set<string>();

  async tryVolumeLease<T>(domain: DomainRef, volumeId: string, _slot: number, _operationId: string, fn: () => Promise<T>): Promise<T> {
    const key = `${domain.id}/${volumeId}`;
    if (this.heldVolumes.has(key)) throw abortedError(`volume ${volumeId} is in use (its lease is held)`, Reason.LEASE_HELD_ON_THIS_HOST);
    this.heldVolumes.add(key);
    try {
      return await fn();
    } finally {
      this.heldVolumes.delete(key);
    }
  }

  async formatLeaseSlot(domain: DomainRef, resourceName: string, slot: number): Promise<void> {
    const layout = new DomainLayout(domain.path);
    const handle = await fs.open(layout.leasesPath, 'r+');
    try {
      const offset = leaseOffset(slot);
      // An "empty lease": the slot's first sector zeroed, the file extended to cover the slot.
      await handle.write(Buffer.alloc(512), 0, 512, offset);
      const { size } = await handle.stat();
      if (size < leaseOffset(slot + 1)) await handle.truncate(leaseOffset(slot + 1));
      await handle.sync();
    } finally {
      await handle.close();
    }
    let slots = this.formattedSlots.get(domain.id);
    if (!slots) this.formattedSlots.set(domain.id, (slots = new Map()));
    slots.set(slot, resourceName);
  }

  async formatDomainLeases(domain: DomainRef, _ioTimeoutSeconds: number): Promise<void> {
    const layout = new DomainLayout(domain.path);
    for (const [file, size] of [
      [layout.idsPath, IDS_FILE_SIZE],
      [layout.leasesPath, leaseOffset(RESERVED_LEASES.length)],
    ] as const) {
      // Mode 0660 and sdmesh's group, opened confined (never through a link at that name).
      const dom = new ConfinedRoot(domain.path);
      if (await dom.exists(file)) await dom.unlink(file);
      const handle = await dom.createFile(file, 'lease-area');
      try {
        await handle.truncate(size);
        await handle.sync();
      } finally {
        await handle.close();
      }
    }
  }
}
