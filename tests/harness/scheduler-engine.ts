import { createLogger, EventPublisher, type pb } from '@sdmesh/common';
import { Registry } from 'prom-client';
import { Engine, type Flow } from '../../services/scheduler/src/engine';
import { MemoryKvStore } from '../../services/scheduler/src/kv-store';
import { LockManager } from '../../services/scheduler/src/locks';
import { SchedulerMetrics } from '../../services/scheduler/src/metrics';
import { OperationIndex } from '../../services/scheduler/src/operation-index';
import { isTerminal, OperationStore } from '../../services/scheduler/src/operation-store';

export const silentLog = createLogger('scheduler-test', 'silent', 'test');

/**
 * One scheduler replica's engine on in-memory KV (unit tests): its flows, its own metrics
 * registry; replicas given the same `ops`/`locks` stores share operations and locks.
 */
export function engineReplica(
  flows: Map<pb.OperationType, Flow>,
  opts: { ops?: MemoryKvStore; locks?: MemoryKvStore; instanceId?: string; beatMs?: number; takeoverMs?: number; indexed?: boolean } = {},
) {
  const opsKv = opts.ops ?? new MemoryKvStore();
  const locksKv = opts.locks ?? new MemoryKvStore();
  const store = new OperationStore(opsKv);
  const locks = new LockManager(locksKv, async (id) => {
    const cur = await store.get(id);
    return !cur || isTerminal(cur.rec.op.status);
  });
  const registry = new Registry();
  const metrics = new SchedulerMetrics(registry);
  const index = opts.indexed ? new OperationIndex({ store, log: silentLog, metrics }) : undefined;
  index?.start();
  const engine = new Engine({
    store,
    locks,
    flows,
    log: silentLog,
    events: new EventPublisher(undefined, { host: 't', service: 'scheduler' }),
    metrics,
    instanceId: opts.instanceId ?? 'r1',
    beatMs: opts.beatMs ?? 50,
    takeoverMs: opts.takeoverMs ?? 300,
    ownerViews: index && (() => index.summaries()),
  });
  return { engine, store, locks, opsKv, locksKv, metrics, registry, index };
}
