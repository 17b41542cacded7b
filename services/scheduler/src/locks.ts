import { aborted, Reason } from '@sdmesh/common';
import { KvConflict, type KvStore } from './kv-store';

export type LockMode = 'exclusive' | 'shared';

/** An engine-level lock on one entity: "disk:<id>" or "domain:<id>". */
export interface LockRequest {
  entity: string;
  mode: LockMode;
}

interface LockValue {
  exclusive?: string;
  shared: string[];
}

export class LockConflict extends Error {
  constructor(
    readonly entity: string,
    readonly blocker: string,
  ) {
    super(`${entity} is locked by operation ${blocker}`);
  }
}

const keyOf = (entity: string) => `lock.${entity.replace(':', '.')}`;

/** Compare-and-set attempts per lock change before it is given up (LOCK_CONTENTION). */
const CAS_ATTEMPTS = 50;
/** Longest pause after a lost compare-and-set (ms). */
const CAS_BACKOFF_MAX_MS = 100;

/**
 * The pause after the attempt-th lost compare-and-set: random up to a bound that doubles from
 * 1 ms. Many writers of one key (a domain's shared lock under a burst of operations: chaos seed
 * 702, 41 snapshots of one domain's disks at once) spread out instead of colliding again at once;
 * without a pause the last of N writers needed about N attempts and some ran out.
 */
const casBackoff = (attempt: number) => new Promise((r) => setTimeout(r, Math.random() * Math.min(CAS_BACKOFF_MAX_MS, 2 ** attempt)));

/**
 * Engine locks in KV with compare-and-set. Taken all-or-nothing, in one global order (sorted
 * by entity), owned by an operation id; idempotent for the same owner, so an operation that
 * resumes after a scheduler restart finds its locks still held. A lock whose owner operation
 * has ended or does not exist (a crash between steps) is taken over (`isStale`).
 */
export class LockManager {
  constructor(
    private readonly kv: KvStore,
    private readonly isStale: (ownerOpId: string) => Promise<boolean>,
  ) {}

  /** Normalises a request list: one mode per entity (exclusive wins), sorted. */
  static normalise(requests: LockRequest[]): LockRequest[] {
    const byEntity = new Map<string, LockMode>();
    for (const r of requests) byEntity.set(r.entity, byEntity.get(r.entity) === 'exclusive' ? 'exclusive' : r.mode);
    return [...byEntity.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([entity, mode]) => ({ entity, mode }));
  }

  /** Takes every lock or none. Throws LockConflict naming the first blocking operation. */
  async acquireAll(owner: string, requests: LockRequest[]): Promise<void> {
    const taken: LockRequest[] = [];
    try {
      for (const r of LockManager.normalise(requests)) {
        await this.acquireOne(owner, r);
        taken.push(r);
      }
    } catch (err) {
      for (const r of taken.reverse()) await this.releaseOne(owner, r.entity).catch(() => undefined);
      throw err;
    }
  }

  /** Polls until every lock is held or the signal aborts; returns the ms waited. */
  async acquireAllWaiting(owner: string, requests: LockRequest[], signal: AbortSignal, onBlocked?: (c: LockConflict) => void): Promise<number> {
    const started = Date.now();
    for (;;) {
      try {
        await this.acquireAll(owner, requests);
        return Date.now() - started;
      } catch (err) {
        if (!(err instanceof LockConflict)) throw err;
        onBlocked?.(err);
        if (signal.aborted) throw signal.reason;
        await new Promise((r) => setTimeout(r, 300));
      }
    }
  }

  private async acquireOne(owner: string, r: LockRequest): Promise<void> {
    const key = keyOf(r.entity);
    // Whether each owner ended, asked once per call (a read of its operation each) and all at once:
    // these reads lie between the read of the lock and its compare-and-set, so they widen the window
    // in which another writer's change makes ours fail (a domain's shared lock names every running
    // operation of the domain).
    const staleness = new Map<string, Promise<boolean>>();
    const isStale = (id: string) => {
      let p = staleness.get(id);
      if (!p) staleness.set(id, (p = this.isStale(id)));
      return p;
    };
    for (let attempt = 0; attempt < CAS_ATTEMPTS; attempt++) {
      if (attempt) await casBackoff(attempt);
      const cur = await this.kv.get(key);
      const v: LockValue = cur ? (JSON.parse(cur.value) as LockValue) : { shared: [] };
      // Owners that ended or vanished leave their locks behind only after a crash: drop them.
      const [exclusiveStale, sharedStale] = await Promise.all([
        v.exclusive && v.exclusive !== owner ? isStale(v.exclusive) : false,
        Promise.all(v.shared.map((s) => (s === owner ? false : isStale(s)))),
      ]);
      if (exclusiveStale) v.exclusive = undefined;
      v.shared = v.shared.filter((_, i) => !sharedStale[i]);
      if (r.mode === 'exclusive') {
        if (v.exclusive === owner) return;
        const other = v.exclusive ?? v.shared.find((s) => s !== owner);
        if (other) throw new LockConflict(r.entity, other);
        v.exclusive = owner;
        v.shared = v.shared.filter((s) => s !== owner);
      } else {
        if (v.exclusive && v.exclusive !== owner) throw new LockConflict(r.entity, v.exclusive);
        if (v.exclusive === owner || v.shared.includes(owner)) return;
        v.shared.push(owner);
      }
      try {
        if (cur) await this.kv.update(key, JSON.stringify(v), cur.revision);
        else await this.kv.create(key, JSON.stringify(v));
        return;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
    throw aborted(`could not update lock ${r.entity}: too much contention`, Reason.LOCK_CONTENTION);
  }

  async releaseOne(owner: string, entity: string): Promise<void> {
    const key = keyOf(entity);
    for (let attempt = 0; attempt < CAS_ATTEMPTS; attempt++) {
      if (attempt) await casBackoff(attempt);
      const cur = await this.kv.get(key);
      if (!cur) return;
      const v = JSON.parse(cur.value) as LockValue;
      if (v.exclusive !== owner && !v.shared.includes(owner)) return;
      const next: LockValue = { exclusive: v.exclusive === owner ? undefined : v.exclusive, shared: v.shared.filter((s) => s !== owner) };
      try {
        if (!next.exclusive && next.shared.length === 0) await this.kv.delete(key, cur.revision);
        else await this.kv.update(key, JSON.stringify(next), cur.revision);
        return;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
  }

  async releaseAll(owner: string, requests: LockRequest[]): Promise<void> {
    for (const r of LockManager.normalise(requests).reverse()) await this.releaseOne(owner, r.entity);
  }

  /** Every lock now held: entity → holders. */
  async list(): Promise<Array<{ entity: string; exclusive?: string; shared: string[] }>> {
    const out: Array<{ entity: string; exclusive?: string; shared: string[] }> = [];
    for (const key of await this.kv.keys('lock')) {
      const cur = await this.kv.get(key);
      if (!cur) continue;
      const v = JSON.parse(cur.value) as LockValue;
      out.push({ entity: key.slice('lock.'.length).replace('.', ':'), exclusive: v.exclusive, shared: v.shared });
    }
    return out;
  }
}
