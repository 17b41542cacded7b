import type { Logger } from '@sdmesh/common';
import { sleep } from './cluster';
import type { KvChange, KvStore, KvWatch } from './kv-store';

/**
 * The keys under one prefix of a KV bucket and their values, kept in memory by one KV watch:
 * read once at start, then updated from the watch's changes (the higher revision wins), watched
 * again if the watch ends. For what a replica reads every poll (host announcements, maintenance,
 * domains): a poll costs no KV request. A write of this replica shows here once the watch
 * delivers it (milliseconds): readers that need their own write at once read KV instead.
 */
export class KvMirror {
  private entries = new Map<string, { value?: string; revision: number }>();
  private watch?: KvWatch;
  private stopped = false;
  private readonly stopSignal = new AbortController();
  private loaded = false;

  constructor(
    private readonly kv: KvStore,
    private readonly prefix: string,
    private readonly log: Logger,
    private readonly rewatchMs = 1000,
  ) {}

  start(): void {
    void this.follow();
  }

  stop(): void {
    this.stopped = true;
    this.stopSignal.abort();
    this.watch?.stop();
  }

  /** Every key under the prefix and its value; undefined until the first full read is in (NATS unreachable at start, say). */
  values(): Map<string, string> | undefined {
    if (!this.loaded) return undefined;
    const out = new Map<string, string>();
    for (const [k, e] of this.entries) if (e.value !== undefined) out.set(k, e.value);
    return out;
  }

  /** This replica's own write (its revision from KV), seen here at once rather than when the watch brings it. */
  noteWrite(key: string, value: string, revision: number): void {
    this.apply(this.entries, { key, value, revision });
  }

  /**
   * This replica's own delete of a key it read at `readRevision`: gone here at once, and an
   * older write the watch still has to deliver does not bring it back (the watch's own delete
   * event, with the real revision, ends the mark).
   */
  noteDelete(key: string, readRevision: number): void {
    const cur = this.entries.get(key);
    if (!cur || cur.revision <= readRevision) this.entries.set(key, { value: undefined, revision: readRevision + 1 });
  }

  private async follow(): Promise<void> {
    while (!this.stopped) {
      try {
        const watch = await this.load();
        this.loaded = true;
        await watch.ended;
        if (!this.stopped) this.log.warn({ prefix: this.prefix }, 'KV watch ended; watching again');
      } catch (err) {
        if (!this.stopped) this.log.warn({ prefix: this.prefix, err: String(err) }, 'KV watch failed; retrying');
      }
      this.watch?.stop();
      await sleep(this.rewatchMs, this.stopSignal.signal).catch(() => undefined);
    }
  }

  /** Watch first, then read every key; what the watch saw meanwhile is applied after (the higher revision wins). */
  private async load(): Promise<KvWatch> {
    const buffered: KvChange[] = [];
    let loading = true;
    const entries = new Map<string, { value?: string; revision: number }>();
    this.watch = await this.kv.watch(this.prefix, (c) => (loading ? buffered.push(c) : this.apply(this.entries, c)));
    for (const key of await this.kv.keys(this.prefix)) {
      const e = await this.kv.get(key);
      if (e) entries.set(key, { value: e.value, revision: e.revision });
    }
    for (const c of buffered) this.apply(entries, c);
    this.entries = entries;
    loading = false;
    return this.watch;
  }

  private apply(entries: Map<string, { value?: string; revision: number }>, c: KvChange): void {
    const cur = entries.get(c.key);
    if (cur && cur.revision >= c.revision) return;
    if (c.value === undefined) entries.delete(c.key);
    else entries.set(c.key, { value: c.value, revision: c.revision });
  }
}
