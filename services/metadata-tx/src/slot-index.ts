/**
 * The lease slots of a domain in use, as an index kept between transactions instead of a
 * scan of every record per create. It is built by one scan (scanLeaseSlots) under the domain
 * lease and stays true only while nobody else writes the domain: for the transactions of one
 * hold, and across holds of this process only when the lease's fencing token proves no other
 * holder came in between (lver of the new hold = lver of the previous + 1; see DomainLeaseHold),
 * or when the slot journal (slot-journal.ts) has what every hold in between added.
 * Only creates add slots and committed volume ids; deletes keep a volume's slot until the GC
 * (another lease holder) collects it, so the index never has to learn of a freed slot.
 */
import { lowestFreeSlot, scanLeaseSlots } from '@sdmesh/common';
import type { DomainLeaseHold } from './leases';
import { entriesBetween, readSlotJournal, type JournalEntry } from './slot-journal';

type SlotScan = Awaited<ReturnType<typeof scanLeaseSlots>>;

export class SlotIndex {
  /** No slot below it is free (slots are only added while the index lives). */
  private lowestCandidate: number;
  /** What the current hold added: its slot journal entry (slot-journal.ts). */
  added: Omit<JournalEntry, 'lver'> = { slots: [], volumes: [] };

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
    this.added.slots.push(slot);
    return slot;
  }

  committed(volumeId: string, imageId: string): void {
    this.scan.committedVolumeIds.set(volumeId, { imageId });
    this.added.volumes.push([volumeId, imageId]);
  }

  /** What other holders added (journal entries of the holds between this process's last hold and this one). */
  catchUp(entries: readonly JournalEntry[]): void {
    for (const e of entries) {
      for (const slot of e.slots) this.scan.usedSlots.add(slot);
      for (const [volumeId, imageId] of e.volumes) this.scan.committedVolumeIds.set(volumeId, { imageId });
    }
    // Slots at or above lowestCandidate may have been taken by others: the search starts over (it skips used ones).
    this.lowestCandidate = this.firstSlot;
  }
}

interface CachedIndex {
  root: string;
  index?: SlotIndex;
  /** The fencing token of the hold the index is known true in (0: none). */
  lver: number;
  /** The hold (DomainLeaseGroups serial) the index is known true in. */
  serial: number;
  /**
   * The index as it was at the end of this process's last hold, when other holders came
   * between (lvers from..to): made true again from the slot journal, if it has their entries.
   */
  behind?: { index: SlotIndex; from: number; to: number };
  /** A transaction of hold `serial` did something the index does not follow (forget()): no journal entry for it. */
  tainted?: boolean;
}

/** The slot indexes of the domains this process writes, by domain id. */
export class SlotIndexes {
  private readonly byDomain = new Map<string, CachedIndex>();

  /** onBuild: told of each index built by a scan or caught up from the slot journal (metrics). */
  constructor(private readonly onBuild?: (how: 'scan' | 'journal') => void) {}

  /**
   * Called at the start of every hold of a domain's lease by this process: keeps the index if
   * the fencing token proves nobody else held the lease since the last hold, else forgets it.
   */
  holdStarted(domainId: string, root: string, lease: DomainLeaseHold, serial: number): void {
    const cached = this.byDomain.get(domainId);
    const lver = lease.lver ?? 0;
    const continued = cached && cached.root === root && cached.lver > 0 && serial === cached.serial + 1 && !cached.tainted;
    if (continued && cached.index) cached.index.added = { slots: [], volumes: [] };
    if (continued && lver === cached.lver + 1) {
      cached.lver = lver;
      cached.serial = serial;
    } else if (continued && cached.index && lver > cached.lver + 1) {
      this.byDomain.set(domainId, { root, lver, serial, behind: { index: cached.index, from: cached.lver + 1, to: lver - 1 } });
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
    const sameHold = cached?.root === root && cached.serial === serial;
    const behind = sameHold ? cached.behind : undefined;
    const missed = behind && entriesBetween(await readSlotJournal(root, domainId), behind.from, behind.to);
    let index: SlotIndex;
    if (behind && missed) {
      behind.index.catchUp(missed);
      index = behind.index;
      this.onBuild?.('journal');
    } else {
      index = new SlotIndex(await scanLeaseSlots(root), maxVolumes, firstSlot);
      this.onBuild?.('scan');
    }
    // (A forget() while this ran leaves the entry deleted or tainted; this only replaces a current one.)
    const now = this.byDomain.get(domainId);
    if (now === cached || !now) this.byDomain.set(domainId, { root, index, lver: sameHold ? cached.lver : 0, serial, tainted: now ? now.tainted : true });
    return index;
  }

  /**
   * Forgets a domain's index: after a failed create (what it left is unknown), a transaction
   * that changes slots or committed ids otherwise (deletes, finalize) or a format. The hold it
   * happened in writes no journal entry.
   */
  forget(domainId: string): void {
    const cached = this.byDomain.get(domainId);
    this.byDomain.set(domainId, { root: cached?.root ?? '', lver: 0, serial: cached?.serial ?? 0, tainted: true });
  }

  /** The journal entry of hold `serial` (at lease version lver), unless something in it was not followed by the index. */
  journalEntry(domainId: string, serial: number, lver: number | undefined): JournalEntry | undefined {
    const cached = this.byDomain.get(domainId);
    if (!lver || !cached || cached.tainted || cached.serial !== serial || cached.lver !== lver) return undefined;
    const added = cached.index?.added ?? { slots: [], volumes: [] };
    return { lver, slots: [...added.slots], volumes: [...added.volumes] };
  }
}
