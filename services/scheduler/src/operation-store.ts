import { pb } from '@sdmesh/common';
import { KvConflict, type KvStore } from './kv-store';
import type { LockRequest } from './locks';

/**
 * An operation as stored in KV: the public view plus what a replica needs to resume it.
 * P is the operation's params type (see operations/): the record is written by that
 * operation's `prepare` and read by its `run`, both typed with the same P.
 */
export interface OperationRecord<P = unknown> {
  id: string;
  op: pb.Operation;
  /** Hash of the request: the same request_id with another request is refused. */
  fingerprint: string;
  /** The validated request, as the operation's prepare returned it. */
  params: P;
  locks: LockRequest[];
  waitForLocks: boolean;
  locksHeld: boolean;
  /** Scheduler replica running it, and when that replica last said so. */
  owner: string;
  ownerBeatMs: number;
  cancelRequested: boolean;
  /**
   * Requests any replica made to the running flow besides a cancel (e.g. `finalize` of an image
   * transfer), by name, with when they were made; the flow reads them with FlowContext.requested.
   */
  requests?: Record<string, number>;
  /** Flow state: step results and per-step bookkeeping (hosts, job ids, attempts). */
  state: Record<string, unknown>;
  /**
   * Set once the retention passed: the record is then a tombstone (the public fields that say
   * what it was, no steps, result, params or state) kept only so a retry of its request_id is
   * refused rather than run again (operation-retention.ts).
   */
  purgedMs?: number;
}

export const TERMINAL = new Set([
  pb.OperationStatus.OPERATION_STATUS_DONE,
  pb.OperationStatus.OPERATION_STATUS_FAILED,
  pb.OperationStatus.OPERATION_STATUS_ABORTED,
]);
export const isTerminal = (s: pb.OperationStatus) => TERMINAL.has(s);

export class LostOwnership extends Error {
  constructor(id: string, owner: string) {
    super(`operation ${id} is now run by ${owner}`);
  }
}

export const OPERATION_KEY_PREFIX = 'op';
const keyOf = (id: string) => `${OPERATION_KEY_PREFIX}.${id}`;
/** The operation id of a key of the bucket. */
export const idOfKey = (key: string) => key.slice(OPERATION_KEY_PREFIX.length + 1);

function encode(r: OperationRecord): string {
  return JSON.stringify({ ...r, op: pb.Operation.toJSON(r.op) });
}

export function decodeOperation(s: string): OperationRecord {
  const raw = JSON.parse(s) as OperationRecord & { op: unknown };
  return { ...raw, op: pb.Operation.fromJSON(raw.op) };
}
const decode = decodeOperation;

/** What is left of an ended operation after its retention: what it was and how it ended. */
function tombstoneOf(r: OperationRecord, now: number): OperationRecord {
  const { name, requestId, type, status, createTime, updateTime, targetResources, error } = r.op;
  return {
    id: r.id,
    op: pb.Operation.fromPartial({ name, requestId, type, status, createTime, updateTime, targetResources, error }),
    fingerprint: r.fingerprint,
    params: null,
    locks: [],
    waitForLocks: false,
    locksHeld: false,
    owner: '',
    ownerBeatMs: 0,
    cancelRequested: false,
    state: {},
    purgedMs: now,
  };
}

/** A record this replica wrote, with the revision KV gave it (a copy: the writer may change its own). */
export type OwnWriteListener = (rec: OperationRecord, revision: number) => void;

/** Operations in KV (bucket sdmesh_operations), every write a compare-and-set. */
export class OperationStore {
  private readonly ownWriteListeners = new Set<OwnWriteListener>();

  constructor(readonly kv: KvStore) {}

  /**
   * Calls `listener` after each record this store wrote (create, update, tombstone; not deletes):
   * the replica's operation index shows its own writes at once instead of when its KV watch
   * brings them. Returns the function that stops it.
   */
  onWrite(listener: OwnWriteListener): () => void {
    this.ownWriteListeners.add(listener);
    return () => this.ownWriteListeners.delete(listener);
  }

  private wrote(encoded: string, revision: number): void {
    if (this.ownWriteListeners.size === 0) return;
    const rec = decode(encoded);
    for (const listener of this.ownWriteListeners) listener(rec, revision);
  }

  async get(id: string): Promise<{ rec: OperationRecord; revision: number } | undefined> {
    const e = await this.kv.get(keyOf(id));
    return e ? { rec: decode(e.value), revision: e.revision } : undefined;
  }

  /** Throws KvConflict if the operation exists. */
  async create(rec: OperationRecord): Promise<void> {
    const encoded = encode(rec);
    this.wrote(encoded, await this.kv.create(keyOf(rec.id), encoded));
  }

  async delete(id: string): Promise<void> {
    await this.kv.delete(keyOf(id));
  }

  /**
   * Replaces an ended operation's record by its tombstone if the record is still the revision
   * the caller saw (another replica may have done it first: KvConflict). Never touches an
   * operation that has not ended; false when there was nothing to do.
   */
  async tombstone(id: string, revision: number, now: number): Promise<boolean> {
    const cur = await this.get(id);
    if (!cur || cur.revision !== revision) throw new KvConflict(keyOf(id));
    if (!isTerminal(cur.rec.op.status) || cur.rec.purgedMs !== undefined) return false;
    const encoded = encode(tombstoneOf(cur.rec, now));
    this.wrote(encoded, await this.kv.update(keyOf(id), encoded, revision));
    return true;
  }

  /** Deletes a record only while it is still at `revision` (KvConflict otherwise), and the marker the delete leaves in KV. */
  async deleteAt(id: string, revision: number): Promise<void> {
    await this.kv.delete(keyOf(id), revision);
    // Best effort: a marker left behind costs a few bytes of the bucket's stream.
    await this.kv.compact(keyOf(id)).catch(() => undefined);
  }

  /**
   * Read-modify-write with compare-and-set, retried on conflict. `mutate` sees the latest
   * record each time (and may throw to give up, e.g. LostOwnership).
   */
  async update(id: string, mutate: (rec: OperationRecord) => void): Promise<OperationRecord> {
    for (let attempt = 0; ; attempt++) {
      const cur = await this.get(id);
      if (!cur) throw new Error(`operation ${id} vanished from KV`);
      mutate(cur.rec);
      cur.rec.op.updateTime = new Date();
      try {
        const encoded = encode(cur.rec);
        this.wrote(encoded, await this.kv.update(keyOf(id), encoded, cur.revision));
        return cur.rec;
      } catch (err) {
        if (!(err instanceof KvConflict) || attempt > 100) throw err;
      }
    }
  }

  async list(): Promise<OperationRecord[]> {
    return (await this.listWithRevisions()).map((e) => e.rec);
  }

  /** Every record with its revision (a full read of the bucket: for start-up, not for every request). */
  async listWithRevisions(): Promise<Array<{ rec: OperationRecord; revision: number }>> {
    const out: Array<{ rec: OperationRecord; revision: number }> = [];
    for (const key of await this.kv.keys(OPERATION_KEY_PREFIX)) {
      const e = await this.kv.get(key);
      if (e) out.push({ rec: decode(e.value), revision: e.revision });
    }
    return out;
  }
}
