import type { KvChange, KvEntry, KvStore, KvWatch } from '../../services/scheduler/src/kv-store';

/** A KvStore that counts the reads of each key (get), over a real or in-memory store. */
export class CountingKv implements KvStore {
  readonly reads = new Map<string, number>();

  constructor(private readonly inner: KvStore) {}

  readsOf(key: string): number {
    return this.reads.get(key) ?? 0;
  }

  get(key: string): Promise<KvEntry | undefined> {
    this.reads.set(key, this.readsOf(key) + 1);
    return this.inner.get(key);
  }
  create(key: string, value: string): Promise<number> {
    return this.inner.create(key, value);
  }
  update(key: string, value: string, revision: number): Promise<number> {
    return this.inner.update(key, value, revision);
  }
  delete(key: string, revision?: number): Promise<void> {
    return this.inner.delete(key, revision);
  }
  keys(prefix?: string): Promise<string[]> {
    return this.inner.keys(prefix);
  }
  watch(prefix: string, onChange: (change: KvChange) => void): Promise<KvWatch> {
    return this.inner.watch(prefix, onChange);
  }
  lastRevision(): Promise<number> {
    return this.inner.lastRevision();
  }
  compact(key: string): Promise<void> {
    return this.inner.compact(key);
  }
}
