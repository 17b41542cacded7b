import type { KV } from '@sdmesh/common';

/** One stored value and the revision a compare-and-set must name. */
export interface KvEntry {
  value: string;
  revision: number;
}

/**
 * The slice of JetStream KV the scheduler uses: compare-and-set by revision (works with
 * nats-server 2.9), no TTLs. A small interface so unit tests can run on `MemoryKvStore`.
 */
export interface KvStore {
  get(key: string): Promise<KvEntry | undefined>;
  /** Creates the key; throws KvConflict if it exists. Returns the new revision. */
  create(key: string, value: string): Promise<number>;
  /** Writes the key if its revision is still `revision`; throws KvConflict otherwise. */
  update(key: string, value: string, revision: number): Promise<number>;
  /** Deletes the key (if `revision` is given, only while it is still that revision). */
  delete(key: string, revision?: number): Promise<void>;
  /** Keys starting with `prefix` (a dot-separated token prefix, e.g. "op"). */
  keys(prefix?: string): Promise<string[]>;
  /**
   * Every change of a key under `prefix` from now on (not the current values: read those after
   * the watch started, and keep the higher revision). Ends with `stop()`, or when the store's
   * connection gives up (`ended`), after which the caller watches again.
   */
  watch(prefix: string, onChange: (change: KvChange) => void): Promise<KvWatch>;
  /** The revision of the bucket's newest write (0 when empty): a watcher that has seen it is up to date. */
  lastRevision(): Promise<number>;
  /**
   * Removes what a delete left of a key (JetStream KV keeps a delete marker per key forever),
   * only while the marker is still its newest entry: a key created again since is not touched.
   */
  compact(key: string): Promise<void>;
}

/** One change seen by a watch: a new value, or (value undefined) a delete. */
export interface KvChange {
  key: string;
  revision: number;
  value?: string;
}

export interface KvWatch {
  stop(): void;
  /** Settles when the watch ends, by stop() or not. */
  ended: Promise<void>;
}

export class KvConflict extends Error {
  constructor(readonly key: string) {
    super(`KV compare-and-set conflict on ${key}`);
    this.name = 'KvConflict';
  }
}

const isConflict = (err: unknown) => {
  const msg = String((err as Error)?.message ?? err);
  return /wrong last sequence|key exists|exists/i.test(msg) || (err as { code?: unknown })?.code === 10071;
};

/**
 * No JetStream server took the request, so nothing was written: the stream has no leader for a
 * moment (a clustered NATS electing a new one after a node died) or the client is reconnecting.
 */
const isUnavailable = (err: unknown) => /no responders|jetstream is not enabled|\b503\b/i.test(String((err as Error)?.message ?? err));
/** The request went out but no answer came back: it may or may not have been applied. */
const isTimeout = (err: unknown) => (err as Error)?.name === 'TimeoutError' || /\btimeout\b/i.test(String((err as Error)?.message ?? err));

/** How long a KV call waits out a NATS node's death (a stream leader election takes seconds). */
export const KV_UNAVAILABLE_RETRY_MS = 30_000;

/**
 * Runs a KV call again while JetStream is briefly unavailable or times out, up to
 * KV_UNAVAILABLE_RETRY_MS: on a 3-node NATS a node's death must not fail the operation whose
 * write it interrupted. `call` is told whether an earlier attempt may have been applied.
 */
async function whileUnavailable<T>(call: (maybeApplied: boolean) => Promise<T>): Promise<T> {
  const until = Date.now() + KV_UNAVAILABLE_RETRY_MS;
  let maybeApplied = false;
  for (let delayMs = 100; ; delayMs = Math.min(delayMs * 2, 1000)) {
    try {
      return await call(maybeApplied);
    } catch (err) {
      const timeout = isTimeout(err);
      if (!(timeout || isUnavailable(err)) || Date.now() + delayMs > until) throw err;
      maybeApplied ||= timeout;
      await new Promise((r) => setTimeout(r, delayMs));
    }
  }
}

/** KvStore over a JetStream KV bucket. */
export class NatsKvStore implements KvStore {
  private readsChecked?: Promise<void>;

  constructor(private readonly kv: KV) {}

  /**
   * On a replicated bucket every read goes to the stream's leader. nats.js reads a KV bucket with
   * JetStream's direct get, which any replica answers, a follower that has not yet applied the
   * newest writes too: on a 3-node NATS, a get just after another client's create missed it in
   * 67 of 500 tries (a GetOperation or WatchOperation on one scheduler replica answered NOT_FOUND
   * for an operation just submitted on another), and a get after an update returned the older
   * revision as often (a compare-and-set then conflicts). The leader has every acknowledged write.
   * Asked once (the bucket's replica count); on a single server nothing changes.
   */
  private leaderReads(): Promise<void> {
    this.readsChecked ??= Promise.resolve()
      .then(() => this.kv.status())
      .then(
        (status) => {
          if (status.replicas > 1) (this.kv as unknown as BucketInternals).direct = false;
        },
        () => {
          this.readsChecked = undefined; // asked again by the next read
        },
      );
    return this.readsChecked;
  }

  async get(key: string): Promise<KvEntry | undefined> {
    await this.leaderReads();
    const e = await whileUnavailable(() => this.kv.get(key));
    if (!e || e.operation !== 'PUT' || e.length === 0) return undefined;
    return { value: e.string(), revision: e.revision };
  }

  /**
   * A write that conflicts after an attempt that timed out may be that attempt, applied: if the
   * key now holds exactly this value, it is ours (values carry ids and times, so another
   * writer's equal value is not a concern) and its revision is returned.
   */
  private async ownWrite(key: string, value: string, maybeApplied: boolean): Promise<number | undefined> {
    if (!maybeApplied) return undefined;
    const now = await this.get(key);
    return now?.value === value ? now.revision : undefined;
  }

  async create(key: string, value: string): Promise<number> {
    return whileUnavailable(async (maybeApplied) => {
      try {
        return await this.kv.create(key, value);
      } catch (err) {
        if (!isConflict(err)) throw err;
        const revision = await this.ownWrite(key, value, maybeApplied);
        if (revision !== undefined) return revision;
        throw new KvConflict(key);
      }
    });
  }

  async update(key: string, value: string, revision: number): Promise<number> {
    return whileUnavailable(async (maybeApplied) => {
      try {
        return await this.kv.update(key, value, revision);
      } catch (err) {
        if (!isConflict(err)) throw err;
        const applied = await this.ownWrite(key, value, maybeApplied);
        if (applied !== undefined) return applied;
        throw new KvConflict(key);
      }
    });
  }

  async delete(key: string, revision?: number): Promise<void> {
    return whileUnavailable(async (maybeApplied) => {
      try {
        await this.kv.delete(key, revision !== undefined ? { previousSeq: revision } : undefined);
      } catch (err) {
        if (!isConflict(err)) throw err;
        // An attempt that timed out and was applied left the key deleted.
        if (maybeApplied && !(await this.get(key))) return;
        throw new KvConflict(key);
      }
    });
  }

  /**
   * The subjects the bucket's stream holds under the prefix, from one stream info request (paged
   * by nats.js past the server's subject limit). Not nats.js's kv.keys(): it lists through a
   * consumer that also delivers the writes made meanwhile and ends only on a message with
   * nothing pending after it, or after 30 s without writes: on a bucket written every second it
   * took 100 s (and gave 73 "keys" for 6), and held a new scheduler replica's operation index
   * for as long. A key whose newest entry is a delete may be listed: callers read each key and
   * skip what is gone.
   */
  async keys(prefix?: string): Promise<string[]> {
    const bucket = this.kv as unknown as BucketInternals;
    const info = await whileUnavailable(() => bucket.jsm.streams.info(bucket.stream, { subjects_filter: bucket.fullKeyName(prefix ? `${prefix}.>` : '>') }));
    return Object.keys(info.state.subjects ?? {}).map((subject) => subject.slice(bucket.prefixLen));
  }

  async watch(prefix: string, onChange: (change: KvChange) => void): Promise<KvWatch> {
    // One ordered push consumer on the server, updates only (the caller reads the current values).
    const it = await this.kv.watch({ key: `${prefix}.>`, include: 'updates' });
    const ended = (async () => {
      for await (const e of it) {
        const deleted = e.operation !== 'PUT' || e.length === 0;
        onChange({ key: e.key, revision: e.revision, value: deleted ? undefined : e.string() });
      }
    })().catch(() => undefined);
    return { stop: () => it.stop(), ended };
  }

  async lastRevision(): Promise<number> {
    return (await whileUnavailable(() => this.kv.status())).streamInfo.state.last_seq;
  }

  async compact(key: string): Promise<void> {
    const e = await this.kv.get(key);
    if (!e || e.operation === 'PUT') return;
    // The bucket's own stream and subject (public members of nats.js's Bucket, not of its KV type).
    const bucket = this.kv as unknown as BucketInternals;
    // Every message of this key up to the marker (by sequence): a later put has a higher one and stays.
    await bucket.jsm.streams.purge(bucket.stream, { filter: bucket.subjectForKey(key), seq: e.revision + 1 });
  }
}

interface BucketInternals {
  stream: string;
  /** Whether get() uses direct get (any replica) rather than the stream leader's message get. */
  direct: boolean;
  subjectForKey(key: string): string;
  /** "$KV.<bucket>.<key>" (keys are not encoded here). */
  fullKeyName(key: string): string;
  /** Length of "$KV.<bucket>.". */
  prefixLen: number;
  jsm: {
    streams: {
      purge(stream: string, opts: { filter: string; seq: number }): Promise<unknown>;
      info(stream: string, opts: { subjects_filter: string }): Promise<{ state: { subjects?: Record<string, number> } }>;
    };
  };
}

/** In-memory KvStore with the same CAS semantics, for unit tests. */
export class MemoryKvStore implements KvStore {
  private seq = 0;
  readonly data = new Map<string, KvEntry>();
  private readonly watchers = new Set<{ prefix: string; onChange: (c: KvChange) => void }>();

  private changed(key: string, revision: number, value?: string): void {
    for (const w of [...this.watchers]) if (key.startsWith(w.prefix + '.')) w.onChange({ key, revision, value });
  }

  async get(key: string): Promise<KvEntry | undefined> {
    const e = this.data.get(key);
    return e ? { ...e } : undefined;
  }
  async create(key: string, value: string): Promise<number> {
    if (this.data.has(key)) throw new KvConflict(key);
    const revision = ++this.seq;
    this.data.set(key, { value, revision });
    this.changed(key, revision, value);
    return revision;
  }
  async update(key: string, value: string, revision: number): Promise<number> {
    const e = this.data.get(key);
    if (!e || e.revision !== revision) throw new KvConflict(key);
    const next = ++this.seq;
    this.data.set(key, { value, revision: next });
    this.changed(key, next, value);
    return next;
  }
  async delete(key: string, revision?: number): Promise<void> {
    const e = this.data.get(key);
    if (revision !== undefined && e?.revision !== revision) throw new KvConflict(key);
    this.data.delete(key);
    this.changed(key, ++this.seq);
  }
  async keys(prefix?: string): Promise<string[]> {
    return [...this.data.keys()].filter((k) => !prefix || k.startsWith(prefix + '.'));
  }
  async lastRevision(): Promise<number> {
    return this.seq;
  }
  async compact(): Promise<void> {
    // A delete here leaves nothing behind.
  }
  async watch(prefix: string, onChange: (change: KvChange) => void): Promise<KvWatch> {
    const w = { prefix, onChange };
    this.watchers.add(w);
    let end!: () => void;
    const ended = new Promise<void>((r) => (end = r));
    return {
      stop: () => {
        this.watchers.delete(w);
        end();
      },
      ended,
    };
  }
}
