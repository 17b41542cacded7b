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
  /** Flow state: step results and per-step bookkeeping (hosts, job ids, attempts). */
  state: Record<string, unknown>;
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

const keyOf = (id: string) => `op.${id}`;

function encode(r: OperationRecord): string {
  return JSON.stringify({ ...r, op: pb.Operation.toJSON(r.op) });
}

function decode(s: string): OperationRecord {
  const raw = JSON.parse(s) as OperationRecord & { op: unknown };
  return { ...raw, op: pb.Operation.fromJSON(raw.op) };
}

/** Operations in KV (bucket sdmesh_operations), every write a compare-and-set. */
export class OperationStore {
  constructor(readonly kv: KvStore) {}

  async get(id: string): Promise<{ rec: OperationRecord; revision: number } | undefined> {
    const e = await this.kv.get(keyOf(id));
    return e ? { rec: decode(e.value), revision: e.revision } : undefined;
  }

  /** Throws KvConflict if the operation exists. */
  async create(rec: OperationRecord): Promise<void> {
    await this.kv.create(keyOf(rec.id), encode(rec));
  }

  async delete(id: string): Promise<void> {
    await this.kv.delete(keyOf(id));
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
        await this.kv.update(keyOf(id), encode(cur.rec), cur.revision);
        return cur.rec;
      } catch (err) {
        if (!(err instanceof KvConflict) || attempt > 100) throw err;
      }
    }
  }

  async list(): Promise<OperationRecord[]> {
    const out: OperationRecord[] = [];
    for (const key of await this.kv.keys('op')) {
      const e = await this.kv.get(key);
      if (e) out.push(decode(e.value));
    }
    return out;
  }
}
