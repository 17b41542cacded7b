import { notFound, Reason } from '@sdmesh/common';
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
}

export const DEFAULT_WARNING_FREE_PERCENT = 10;
export const DEFAULT_CRITICAL_FREE_BYTES = 5 * 1024 ** 3;

const keyOf = (id: string) => `domain.${id}`;

/** Registry of domain id → path in KV (bucket sdmesh_domains). */
export class DomainRegistry {
  constructor(private readonly kv: KvStore) {}

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
    return out.sort((a, b) => a.createTimeMs - b.createTimeMs || a.id.localeCompare(b.id));
  }

  /** Registers a domain (idempotent for the same entry). */
  async put(entry: DomainEntry): Promise<void> {
    try {
      await this.kv.create(keyOf(entry.id), JSON.stringify(entry));
    } catch (err) {
      if (!(err instanceof KvConflict)) throw err;
    }
  }

  /** Flags a domain being removed (idempotent). */
  async markRemoving(id: string): Promise<void> {
    for (;;) {
      const e = await this.kv.get(keyOf(id));
      if (!e) return;
      const entry = JSON.parse(e.value) as DomainEntry;
      if (entry.removing) return;
      try {
        await this.kv.update(keyOf(id), JSON.stringify({ ...entry, removing: true }), e.revision);
        return;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
  }

  async remove(id: string): Promise<void> {
    await this.kv.delete(keyOf(id));
  }
}
