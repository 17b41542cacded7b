import { notFound, Reason, type Logger } from '@sdmesh/common';
import { KvMirror } from './kv-mirror';
import { KvConflict, type KvStore } from './kv-store';

/** What the scheduler keeps about a domain: where it is. Its contents are read from storage. */
export interface DomainEntry {
  id: string;
  name: string;
  path: string;
  /** Warning event when free space falls below this percentage. */
  warningFreePercent: number;
  /** New allocations refused below this many free bytes. */
  criticalFreeBytes: number;
  createTimeMs: number;
  /** Set while RemoveStorageDomain runs: heartbeating hosts are no longer told to join it. */
  removing?: boolean;
  /** Deactivated (maintenance): no operation runs on it and no host is in its lockspace. */
  maintenance?: boolean;
  /**
   * The scheduler's latest order for this domain (epoch ms): its creation, attach or activation
   * while active, its deactivation or removal otherwise. Joins and leaves carry it, so a host's
   * lease-manager obeys only the newest order (LeaseManager.checkJoinOrder).
   */
  epochMs?: number;
}

/** A domain removed from the registry: hosts still seen in its lockspace are told to leave it. */
export interface RemovedDomain {
  id: string;
  path: string;
  epochMs: number;
}

export const isActive = (d: DomainEntry): boolean => !d.removing && !d.maintenance;
export const epochOf = (d: DomainEntry): number => d.epochMs ?? d.createTimeMs;
/** An epoch for a new order: now, and always after the domain's last one. */
export const nextEpoch = (d: DomainEntry | undefined): number => Math.max(Date.now(), d ? epochOf(d) + 1 : 0);

const byCreation = (a: DomainEntry, b: DomainEntry) => a.createTimeMs - b.createTimeMs || a.id.localeCompare(b.id);

export const DEFAULT_WARNING_FREE_PERCENT = 10;
export const DEFAULT_CRITICAL_FREE_BYTES = 5 * 1024 ** 3;

const keyOf = (id: string) => `domain.${id}`;
const removedKeyOf = (id: string) => `removed.${id}`;

/** Registry of domain id → path in KV (bucket sdmesh_domains). */
export class DomainRegistry {
  /** Registered and removed domains followed by KV watches, for the host poll (see follow()). */
  private mirrors?: { domains: KvMirror; removed: KvMirror };

  constructor(private readonly kv: KvStore) {}

  /**
   * Follows the registry with KV watches, so the host poll (every second) reads it from memory
   * (polled()) instead of listing the bucket. Reads that must see this replica's own writes at
   * once (the API, operations, heartbeat answers) still read KV.
   */
  follow(log: Logger): void {
    this.mirrors = { domains: new KvMirror(this.kv, 'domain', log), removed: new KvMirror(this.kv, 'removed', log) };
    this.mirrors.domains.start();
    this.mirrors.removed.start();
  }

  stopFollowing(): void {
    this.mirrors?.domains.stop();
    this.mirrors?.removed.stop();
  }

  /**
   * The registry as the host poll sees it: from the watches once they have read KV (a change
   * shows within the watch's delay), from KV before that or without follow().
   */
  async polled(): Promise<{ domains: DomainEntry[]; leaveOrders: { id: string; epochMs: number }[] }> {
    const domains = this.mirrors?.domains.values();
    const removed = this.mirrors?.removed.values();
    if (!domains || !removed) {
      const registered = await this.list();
      return { domains: registered, leaveOrders: this.leaveOrdersOf(registered, await this.removed()) };
    }
    const registered = [...domains.values()].map((v) => JSON.parse(v) as DomainEntry).sort(byCreation);
    return {
      domains: registered,
      leaveOrders: await this.leaveOrdersOf(
        registered,
        [...removed.values()].map((v) => JSON.parse(v) as RemovedDomain),
      ),
    };
  }

  async find(id: string): Promise<DomainEntry | undefined> {
    const e = await this.kv.get(keyOf(id));
    return e ? (JSON.parse(e.value) as DomainEntry) : undefined;
  }

  async get(id: string): Promise<DomainEntry> {
    const d = await this.find(id);
    if (!d) throw notFound(`storage domain ${id} is not known to the scheduler`, Reason.DOMAIN_NOT_FOUND);
    return d;
  }

  async list(): Promise<DomainEntry[]> {
    const out: DomainEntry[] = [];
    for (const key of await this.kv.keys('domain')) {
      const e = await this.kv.get(key);
      if (e) out.push(JSON.parse(e.value) as DomainEntry);
    }
    return out.sort(byCreation);
  }

  /** Registers a domain (idempotent for the same entry). */
  async put(entry: DomainEntry): Promise<void> {
    try {
      await this.kv.create(keyOf(entry.id), JSON.stringify(entry));
    } catch (err) {
      if (!(err instanceof KvConflict)) throw err;
    }
  }

  /** Changes a registered domain by compare-and-set (a no-op if it is gone or unchanged); returns the entry as written. */
  async update(id: string, change: (entry: DomainEntry) => DomainEntry): Promise<DomainEntry | undefined> {
    for (;;) {
      const e = await this.kv.get(keyOf(id));
      if (!e) return undefined;
      const entry = JSON.parse(e.value) as DomainEntry;
      const next = change(entry);
      if (JSON.stringify(next) === e.value) return entry;
      try {
        await this.kv.update(keyOf(id), JSON.stringify(next), e.revision);
        return next;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
  }

  /** Flags a domain being removed (idempotent), with the epoch of the removal order. */
  async markRemoving(id: string, epochMs: number): Promise<void> {
    await this.update(id, (e) => (e.removing ? e : { ...e, removing: true, epochMs }));
  }

  /** Unregisters a domain, leaving a record of it so hosts still in its lockspace are told to leave. */
  async removeLeavingRecord(entry: DomainEntry): Promise<void> {
    const removed: RemovedDomain = { id: entry.id, path: entry.path, epochMs: epochOf(entry) };
    const key = removedKeyOf(entry.id);
    for (let written = false; !written;) {
      const cur = await this.kv.get(key);
      try {
        if (cur) await this.kv.update(key, JSON.stringify(removed), cur.revision);
        else await this.kv.create(key, JSON.stringify(removed));
        written = true;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
    await this.remove(entry.id);
  }

  /** Domains removed from the registry (see removeLeavingRecord). */
  async removed(): Promise<RemovedDomain[]> {
    const out: RemovedDomain[] = [];
    for (const key of await this.kv.keys('removed')) {
      const e = await this.kv.get(key);
      if (e) out.push(JSON.parse(e.value) as RemovedDomain);
    }
    return out;
  }

  /** Lockspaces no host may be in: deactivated domains, domains being removed, removed domains. */
  async leaveOrders(): Promise<{ id: string; epochMs: number }[]> {
    const registered = await this.list();
    return this.leaveOrdersOf(registered, await this.removed());
  }

  private leaveOrdersOf(registered: DomainEntry[], removedDomains: RemovedDomain[]): { id: string; epochMs: number }[] {
    const inactive = registered.filter((d) => !isActive(d)).map((d) => ({ id: d.id, epochMs: epochOf(d) }));
    const removed = removedDomains.filter((r) => !registered.some((d) => d.id === r.id));
    return [...inactive, ...removed.map((r) => ({ id: r.id, epochMs: r.epochMs }))];
  }

  /** Forgets a removed domain's record (it is attached again). */
  async forgetRemoved(id: string): Promise<void> {
    if (await this.kv.get(removedKeyOf(id))) await this.kv.delete(removedKeyOf(id));
  }

  async remove(id: string): Promise<void> {
    await this.kv.delete(keyOf(id));
  }
}
