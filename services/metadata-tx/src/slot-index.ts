/**
 * The lease slots of a domain in use, as an index kept between transactions instead of a
 * scan of every record per create. It is built by one scan (scanLeaseSlots) under the domain
 * lease and stays true only while nobody else writes the domain: for the transactions of one
 * hold, and across holds of this process only when the lease's fencing token proves no other
 * holder came in between (lver of the new hold = lver of the previous + 1; see DomainLeaseHold).
 * Only creates add slots and committed volume ids; deletes keep a volume's slot until the GC
 * (another lease holder) collects it, so the index never has to learn of a freed slot.
 */
import { lowestFreeSlot, scanLeaseSlots } from '@sdmesh/common';
import type { DomainLeaseHold } from './leases';

type SlotScan = Awaited<ReturnType<typeof scanLeaseSlots>>;

export class SlotIndex {
  /** No slot below it is free (slots are only added while the index lives). */
  private lowestCandidate: number;

  constructor(
    private readonly scan: SlotScan,
    private readonly maxVolumes: number,
    private readonly firstSlot: number,
  ) {
    this.lowestCandidate = firstSlot;
  }

  /** The image of a committed volume with this id, if any (volume ids are unique per domain). */
  committedImageOf(volumeId: string): string | undefined {
    return this.scan.committedVolumeIds.get(volumeId)?.imageId;
  }

  /** The lowest free slot, now counted as used (RESOURCE_EXHAUSTED NO_FREE_LEASE_SLOT if none). */
  allocate(): number {
    const end = this.firstSlot + this.maxVolumes;
    let slot = this.lowestCandidate;
    while (slot < end && this.scan.usedSlots.has(slot)) slot++;
    // None left: lowestFreeSlot over the whole range throws the domain's NO_FREE_LEASE_SLOT.
    if (slot >= end) slot = lowestFreeSlot(this.scan.usedSlots, this.maxVolumes, this.firstSlot);
    this.scan.usedSlots.add(slot);
    this.lowestCandidate = slot + 1;
    return slot;
  }

  committed(volumeId: string, imageId: string): void {
    this.scan.committedVolumeIds.set(volumeId, { imageId });
  }
}

interface CachedIndex {
  root: string;
  index?: SlotIndex;
  /** The fencing token of the hold the index is known true in (0: none). */
  lver: number;
  /** The hold (DomainLeaseGroups serial) the index is known true in. */
  serial: number;
}

/** The slot indexes of the domains this process writes, by domain id. */
export class SlotIndexes {
  private readonly byDomain = new Map<string, CachedIndex>();

  /**
   * Called at the start of every hold of a domain's lease by this process: keeps the index if
   * the fencing token proves nobody else held the lease since the last hold, else forgets it.
   */
  holdStarted(domainId: string, root: string, lease: DomainLeaseHold, serial: number): void {
    const cached = this.byDomain.get(domainId);
    const lver = lease.lver ?? 0;
    if (cached && cached.root === root && cached.lver > 0 && lver === cached.lver + 1 && serial === cached.serial + 1) {
      cached.lver = lver;
      cached.serial = serial;
    } else {
      this.byDomain.set(domainId, { root, lver, serial });
    }
  }

  /** Whether hold `serial` has a true index of the domain. */
  has(domainId: string, root: string, serial: number): boolean {
    const cached = this.byDomain.get(domainId);
    return !!cached?.index && cached.root === root && cached.serial === serial;
  }

  /** The domain's index, built by one scan if this hold has none yet. Call only under the domain lease, in hold `serial`. */
  async get(domainId: string, root: string, serial: number, maxVolumes: number, firstSlot: number): Promise<SlotIndex> {
    const cached = this.byDomain.get(domainId);
    if (cached?.index && cached.root === root && cached.serial === serial) return cached.index;
    const index = new SlotIndex(await scanLeaseSlots(root), maxVolumes, firstSlot);
    this.byDomain.set(domainId, { root, index, lver: cached?.serial === serial ? cached.lver : 0, serial });
    return index;
  }

  /** Forgets a domain's index: after a failed create (what it left is unknown) or a format. */
  forget(domainId: string): void {
    this.byDomain.delete(domainId);
  }
}
