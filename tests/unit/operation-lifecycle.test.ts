import { pb, SdmeshError, type CallContext } from '@sdmesh/common';
import { Metadata } from '@grpc/grpc-js';
import { Registry } from 'prom-client';
import { Engine, progressOfSteps, type Flow } from '../../services/scheduler/src/engine';
import { operationIdFor, operationName, parseOperationName } from '../../services/scheduler/src/ids';
import { MemoryKvStore, type KvChange, type KvWatch } from '../../services/scheduler/src/kv-store';
import { OperationIndex } from '../../services/scheduler/src/operation-index';
import { OperationRetention } from '../../services/scheduler/src/operation-retention';
import { isTerminal, OperationStore } from '../../services/scheduler/src/operation-store';
import { ProgressThrottle } from '../../services/scheduler/src/progress-throttle';
import { listOperations, waitOperation, watchOperation } from '../../services/scheduler/src/queries';
import { engineReplica, silentLog } from '../harness/scheduler-engine';

/**
 * The operation lifecycle around the engine: the KV-watched operation index (lists, filters,
 * paging), WatchOperation/WaitOperation without polling, the two-stage retention with two
 * replicas on one KV, and step progress that moves (throttled, trailing value kept).
 */

const T = pb.OperationType;
const S = pb.OperationStatus;
const log = silentLog;
const DOMAIN_A = '0a0a0a0a-0000-4000-8000-000000000001';
const DOMAIN_B = '0b0b0b0b-0000-4000-8000-000000000002';
const diskId = (n: number) => `dddddddd-0000-4000-8000-${String(n).padStart(12, '0')}`;

/** One scheduler replica over a shared KV: engine, index and metrics. */
function replica(kv: MemoryKvStore, locksKv: MemoryKvStore, flows: Map<pb.OperationType, Flow>, instanceId: string) {
  const r = engineReplica(flows, { ops: kv, locks: locksKv, instanceId, takeoverMs: 5000 });
  const index = new OperationIndex({ store: r.store, log, metrics: r.metrics });
  index.start();
  return { ...r, index };
}

const submitDisk = (engine: Engine, requestId: string, domain: string, disk: string, type = T.OPERATION_TYPE_CREATE_DISK, request: unknown = {}) =>
  engine.submit({
    type,
    requestId,
    request: { domain, disk, ...(request as object) },
    waitForLocks: false,
    prepare: async () => ({ params: {}, locks: [{ entity: `disk:${disk}`, mode: 'exclusive' }], targetResources: [`storageDomains/${domain}/disks/${disk}`] }),
  });

async function until(pred: () => Promise<boolean> | boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error('timeout');
    await new Promise((r) => setTimeout(r, 10));
  }
}

const callCtx = (signal: AbortSignal, deadlineMs = 10_000): CallContext => ({
  method: 'test',
  deadline: new Date(Date.now() + deadlineMs),
  signal,
  metadata: new Metadata(),
  peer: 'test',
  identity: { kind: 'insecure' },
  log,
});

const gauge = async (registry: Registry, name: string) => (await registry.getSingleMetric(name)!.get()).values.reduce((s, v) => s + v.value, 0);

const reasonOf = async (p: Promise<unknown>) => {
  try {
    await p;
    return 'OK';
  } catch (err) {
    return SdmeshError.from(err).reason;
  }
};

describe('operation index: lists with filters and paging', () => {
  const kv = new MemoryKvStore();
  const gates = new Map<string, () => void>();
  const blocking: Flow = {
    run: async (ctx) => {
      await ctx.step('wait', () => new Promise<null>((r) => gates.set(ctx.id, () => r(null))));
      return undefined;
    },
  };
  const flows = new Map<pb.OperationType, Flow>([
    [T.OPERATION_TYPE_CREATE_DISK, { run: async () => undefined }],
    [T.OPERATION_TYPE_MOVE_DISK, blocking],
  ]);
  const r = replica(kv, new MemoryKvStore(), flows, 'r1');
  const list = (filter: string, pageSize = 0, pageToken = '') => listOperations(r.index, r.store, { filter, pageSize, pageToken });

  beforeAll(async () => {
    // A few ms apart: the order is by create time (ties by id).
    for (let i = 1; i <= 7; i++) {
      await submitDisk(r.engine, `create-${i}`, i <= 4 ? DOMAIN_A : DOMAIN_B, diskId(i));
      await new Promise((res) => setTimeout(res, 3));
    }
    await submitDisk(r.engine, 'move-1', DOMAIN_A, diskId(1), T.OPERATION_TYPE_MOVE_DISK);
    await until(async () => (await r.index.summaries()).filter((s) => isTerminal(s.status)).length === 7);
  });
  afterAll(async () => {
    for (const open of gates.values()) open();
    await r.engine.stop();
    r.index.stop();
  });

  test('by disk, domain, type, status and request id, oldest first', async () => {
    const names = async (filter: string) => (await list(filter)).operations.map((o) => o.requestId);
    expect(await names(`disk=${diskId(1)}`)).toEqual(['create-1', 'move-1']);
    expect(await names(`domain=${DOMAIN_B}`)).toEqual(['create-5', 'create-6', 'create-7']);
    expect(await names(`domain=${DOMAIN_A} AND type=MOVE_DISK`)).toEqual(['move-1']);
    expect(await names(`type=create_disk AND status=DONE AND domain=${DOMAIN_A}`)).toEqual(['create-1', 'create-2', 'create-3', 'create-4']);
    expect(await names('status=RUNNING')).toEqual(['move-1']);
    expect(await names('request_id=create-3')).toEqual(['create-3']);
    expect(await names(`target=storageDomains/${DOMAIN_B}/disks/${diskId(6)}`)).toEqual(['create-6']);
    expect(await names(`disk=${diskId(99)}`)).toEqual([]);
  });

  test('pages follow one another by position, bound to their filter', async () => {
    const seen: string[] = [];
    let token = '';
    let pages = 0;
    do {
      const page = await list('type=CREATE_DISK', 3, token);
      seen.push(...page.operations.map((o) => o.requestId));
      token = page.nextPageToken;
      pages++;
    } while (token);
    expect(seen).toEqual(['create-1', 'create-2', 'create-3', 'create-4', 'create-5', 'create-6', 'create-7']);
    expect(pages).toBe(3);
    const first = await list('type=CREATE_DISK', 3);
    expect(await reasonOf(list('type=MOVE_DISK', 3, first.nextPageToken))).toBe('INVALID_PAGE_TOKEN');
    expect(await reasonOf(list('type=CREATE_DISK', 3, 'bm90LWEtdG9rZW4'))).toBe('INVALID_PAGE_TOKEN');
    // Absurd sizes: negative refused, huge ones capped.
    expect(await reasonOf(list('', -1))).toBe('INVALID_PAGE_SIZE');
    expect((await list('', 1_000_000)).operations).toHaveLength(8);
  });

  test('bad filters are refused INVALID_FILTER', async () => {
    for (const bad of [
      'disk=not-a-uuid',
      'domain=ABC',
      'type=NOPE',
      'status=SLEEPING',
      'owner=x',
      'disk',
      'x'.repeat(1001),
      `disk=${diskId(1)} OR type=MOVE_DISK`,
    ]) {
      expect([bad.slice(0, 30), await reasonOf(list(bad))]).toEqual([bad.slice(0, 30), 'INVALID_FILTER']);
    }
  });
});

describe('WatchOperation and WaitOperation follow the KV watch', () => {
  test('streams every change to the end; many streams opened and cancelled leave no subscription behind', async () => {
    const kv = new MemoryKvStore();
    let open!: () => void;
    const gate = new Promise<null>((r) => (open = () => r(null)));
    const flows = new Map<pb.OperationType, Flow>([
      [
        T.OPERATION_TYPE_CREATE_DISK,
        {
          run: async (ctx) => {
            await ctx.step('first', async () => null);
            await ctx.step('wait', () => gate);
            return undefined;
          },
        },
      ],
    ]);
    const r = replica(kv, new MemoryKvStore(), flows, 'r1');
    const op = await submitDisk(r.engine, 'watched', DOMAIN_A, diskId(1));
    await r.index.ready;

    // 50 streams, cancelled at different points: some never read, some read once, some left suspended.
    const controllers = Array.from({ length: 50 }, () => new AbortController());
    const streams = controllers.map((c) => watchOperation(r.index, { name: op.name }, callCtx(c.signal))[Symbol.asyncIterator]());
    await Promise.all(streams.slice(10).map((s) => s.next()));
    await until(async () => (await gauge(r.registry, 'sdmesh_scheduler_operation_watchers')) === 40);
    for (const c of controllers) c.abort();
    await Promise.all(streams.slice(10, 30).map((s) => s.return?.(undefined)));
    await until(async () => r.index.subscriptionCount() === 0);
    expect(await gauge(r.registry, 'sdmesh_scheduler_operation_watchers')).toBe(0);

    // A stream whose deadline passes before the operation ends fails with it (not a clean end).
    const deadline = new AbortController();
    const cut = watchOperation(r.index, { name: op.name }, callCtx(deadline.signal))[Symbol.asyncIterator]();
    await cut.next();
    deadline.abort(new Error('deadline passed'));
    await expect(cut.next()).rejects.toThrow('deadline passed');
    expect(r.index.subscriptionCount()).toBe(0);

    // One stream to the end, and a WaitOperation woken by the same watch.
    const seen: pb.Operation[] = [];
    const watching = (async () => {
      for await (const o of watchOperation(r.index, { name: op.name }, callCtx(new AbortController().signal))) seen.push(o);
    })();
    const waited = waitOperation(r.index, { name: op.name, timeoutSeconds: 0 }, callCtx(new AbortController().signal));
    await until(() => seen.some((o) => o.currentStep === 'wait'));
    open();
    await watching;
    expect((await waited).status).toBe(S.OPERATION_STATUS_DONE);
    expect(seen.at(-1)!.status).toBe(S.OPERATION_STATUS_DONE);
    // Each state once: a change is streamed once, in order.
    expect(new Set(seen.map((o) => JSON.stringify(pb.Operation.toJSON(o)))).size).toBe(seen.length);
    expect(seen.map((o) => o.updateTime!.getTime())).toEqual(seen.map((o) => o.updateTime!.getTime()).sort((x, y) => x - y));
    expect(r.index.subscriptionCount()).toBe(0);

    // A wait that times out returns the operation as it is; unknown operations are NOT_FOUND.
    const other = await submitDisk(r.engine, 'other', DOMAIN_A, diskId(2));
    expect(
      await reasonOf(waitOperation(r.index, { name: operationName(operationIdFor('nope')), timeoutSeconds: 1 }, callCtx(new AbortController().signal))),
    ).toBe('OPERATION_NOT_FOUND');
    expect(await reasonOf(waitOperation(r.index, { name: other.name, timeoutSeconds: -1 }, callCtx(new AbortController().signal)))).toBe('INVALID_TIMEOUT');
    await r.engine.stop();
    r.index.stop();
  });
});

/**
 * In-memory KV that lags as JetStream KV does on a loaded machine: its watches can be held back
 * (changes queued, then delivered in one burst, as a watch catching up does) and its key listing
 * can be held (a slow full read of the bucket: it took 80 s in a failed integration run).
 */
class LaggingKv extends MemoryKvStore {
  private heldChanges?: Array<() => void>;
  private listing?: Promise<void>;
  private endListing?: () => void;

  holdWatches(): void {
    this.heldChanges ??= [];
  }
  releaseWatches(): void {
    const held = this.heldChanges ?? [];
    this.heldChanges = undefined;
    for (const deliver of held) deliver();
  }
  holdListing(): void {
    this.listing = new Promise((r) => (this.endListing = r));
  }
  releaseListing(): void {
    this.endListing?.();
    this.listing = undefined;
  }
  override async watch(prefix: string, onChange: (change: KvChange) => void): Promise<KvWatch> {
    return super.watch(prefix, (c) => (this.heldChanges ? this.heldChanges.push(() => onChange(c)) : onChange(c)));
  }
  override async keys(prefix?: string): Promise<string[]> {
    await this.listing;
    return super.keys(prefix);
  }
}

describe('a lagging KV: watchers and lists on any replica still see what a submit wrote', () => {
  /** A replica that runs operations (its one flow waits for `open`), and another replica's index over the same KV. */
  function twoReplicas(kv: LaggingKv) {
    let open!: () => void;
    const gate = new Promise<null>((r) => (open = () => r(null)));
    const flow: Flow = { run: async (ctx) => (await ctx.step('wait', () => gate), undefined) };
    const runner = engineReplica(new Map([[T.OPERATION_TYPE_CREATE_DISK, flow]]), { ops: kv, instanceId: 'r1' });
    const otherStore = new OperationStore(kv);
    const other = new OperationIndex({ store: otherStore, log });
    return { runner, other, otherStore, open };
  }

  /** Every message of a WatchOperation stream, and how it ended. */
  function follow(index: OperationIndex, name: string) {
    const seen: pb.Operation[] = [];
    const ended = (async () => {
      for await (const o of watchOperation(index, { name }, callCtx(new AbortController().signal, 30_000))) seen.push(o);
      return 'OK';
    })().catch((err: unknown) => SdmeshError.from(err).reason);
    return { seen, ended };
  }

  test("a replica whose first read of the bucket is slow streams the other replica's changes meanwhile (was: nothing until the read ended)", async () => {
    const kv = new LaggingKv();
    const { runner, other, otherStore, open } = twoReplicas(kv);
    kv.holdListing();
    other.start();
    const op = await submitDisk(runner.engine, 'copy-progress', DOMAIN_A, diskId(1));
    const watch = follow(other, op.name);
    await until(() => watch.seen.some((o) => o.currentStep === 'wait'), 20_000);
    open();
    expect(await watch.ended).toBe('OK');
    expect(watch.seen.at(-1)!.status).toBe(S.OPERATION_STATUS_DONE);
    // The read ends: the list has the operation, ended.
    kv.releaseListing();
    const listed = await listOperations(other, otherStore, { filter: `disk=${diskId(1)}`, pageSize: 0, pageToken: '' });
    expect(listed.operations.map((o) => [o.requestId, o.status])).toEqual([['copy-progress', S.OPERATION_STATUS_DONE]]);
    await runner.engine.stop();
    other.stop();
  });

  test('changes delivered in one burst never hide how the operation ended behind its purge and delete (was: NOT_FOUND)', async () => {
    const kv = new LaggingKv();
    const { runner, other, open } = twoReplicas(kv);
    other.start();
    await other.ready;
    const op = await submitDisk(runner.engine, 'copy-progress', DOMAIN_A, diskId(1));
    const id = parseOperationName(op.name);
    const watch = follow(other, op.name);
    const waited = waitOperation(other, { name: op.name, timeoutSeconds: 0 }, callCtx(new AbortController().signal, 30_000));
    await until(() => watch.seen.some((o) => o.currentStep === 'wait'), 20_000);
    // The other replica's watch falls behind while the operation ends, is purged and its tombstone deleted.
    kv.holdWatches();
    open();
    await until(async () => isTerminal((await runner.store.get(id))!.rec.op.status), 20_000);
    const ended = (await runner.store.get(id))!;
    expect(await runner.store.tombstone(id, ended.revision, Date.now())).toBe(true);
    await runner.store.deleteAt(id, (await runner.store.get(id))!.revision);
    kv.releaseWatches();
    expect(await watch.ended).toBe('OK');
    expect(watch.seen.at(-1)!.status).toBe(S.OPERATION_STATUS_DONE);
    expect((await waited).status).toBe(S.OPERATION_STATUS_DONE);
    await runner.engine.stop();
    other.stop();
  });

  test("a replica's own writes are in its index at once: its list and watchers see them whatever its watch (read-your-writes)", async () => {
    const kv = new LaggingKv();
    let open!: () => void;
    const gate = new Promise<null>((r) => (open = () => r(null)));
    const r = replica(
      kv,
      new MemoryKvStore(),
      new Map([[T.OPERATION_TYPE_CREATE_DISK, { run: async (ctx) => (await ctx.step('wait', () => gate), undefined) }]]),
      'r1',
    );
    await r.index.ready;
    kv.holdWatches();
    const op = await submitDisk(r.engine, 'mine', DOMAIN_A, diskId(1));
    const listed = await listOperations(r.index, r.store, { filter: `disk=${diskId(1)}`, pageSize: 0, pageToken: '' });
    expect(listed.operations.map((o) => o.requestId)).toEqual(['mine']);
    const watch = follow(r.index, op.name);
    await until(() => watch.seen.some((o) => o.currentStep === 'wait'), 20_000);
    open();
    expect(await watch.ended).toBe('OK');
    expect(watch.seen.at(-1)!.status).toBe(S.OPERATION_STATUS_DONE);
    kv.releaseWatches();
    await r.engine.stop();
    r.index.stop();
  });
});

describe('retention: two stages, two replicas', () => {
  test('ended operations become tombstones, then go; running ones stay; a retried request_id is refused, not re-run', async () => {
    const kv = new MemoryKvStore();
    const locksKv = new MemoryKvStore();
    let runs = 0;
    let open!: () => void;
    const gate = new Promise<null>((r) => (open = () => r(null)));
    const flows = new Map<pb.OperationType, Flow>([
      [
        T.OPERATION_TYPE_DELETE_DISK,
        {
          run: async () => {
            runs++;
            return undefined;
          },
        },
      ],
      [T.OPERATION_TYPE_MOVE_DISK, { run: async (ctx) => (await ctx.step('wait', () => gate), undefined) }],
    ]);
    const a = replica(kv, locksKv, flows, 'r1');
    const b = replica(kv, locksKv, flows, 'r2');
    let now = Date.now();
    const retention = (r: typeof a) =>
      new OperationRetention({
        index: r.index,
        store: r.store,
        log,
        metrics: r.metrics,
        operationRetentionMs: 60_000,
        requestIdRetentionMs: 600_000,
        now: () => now,
      });
    const [ra, rb] = [retention(a), retention(b)];

    const deleted = await submitDisk(a.engine, 'delete-1', DOMAIN_A, diskId(1), T.OPERATION_TYPE_DELETE_DISK);
    await submitDisk(a.engine, 'move-2', DOMAIN_A, diskId(2), T.OPERATION_TYPE_MOVE_DISK);
    const id = operationIdFor('delete-1');
    await until(async () => (await a.engine.get(id)).status === S.OPERATION_STATUS_DONE);
    await until(async () => (await b.index.summaries()).some((s) => s.id === id && s.status === S.OPERATION_STATUS_DONE));
    expect(runs).toBe(1);

    // Within the retention: nothing purged, a retry gets the operation.
    expect([await ra.sweep(), await rb.sweep()]).toEqual([
      { records: 0, requestIds: 0 },
      { records: 0, requestIds: 0 },
    ]);
    expect((await submitDisk(b.engine, 'delete-1', DOMAIN_A, diskId(1), T.OPERATION_TYPE_DELETE_DISK)).name).toBe(deleted.name);

    // Past it: both replicas sweep at once; exactly one tombstone written; the running move untouched.
    now += 61_000;
    const [x, y] = await Promise.all([ra.sweep(), rb.sweep()]);
    expect(x.records + y.records).toBe(1);
    expect((await gauge(a.registry, 'sdmesh_scheduler_operations_purged_total')) + (await gauge(b.registry, 'sdmesh_scheduler_operations_purged_total'))).toBe(
      1,
    );
    expect(await reasonOf(a.engine.get(id))).toBe('OPERATION_PURGED');
    await expect(b.engine.get(id)).rejects.toThrow(/ended DONE at .*was purged/);
    expect(await reasonOf(a.engine.cancel(id))).toBe('OPERATION_PURGED');
    expect((await a.engine.get(operationIdFor('move-2'))).status).toBe(S.OPERATION_STATUS_RUNNING);
    // The same request again: refused, not run a second time; another request under the id: still REUSED.
    expect(await reasonOf(submitDisk(b.engine, 'delete-1', DOMAIN_A, diskId(1), T.OPERATION_TYPE_DELETE_DISK))).toBe('REQUEST_ID_EXPIRED');
    expect(await reasonOf(submitDisk(b.engine, 'delete-1', DOMAIN_A, diskId(9), T.OPERATION_TYPE_DELETE_DISK))).toBe('REQUEST_ID_REUSED');
    expect(runs).toBe(1);
    // Lists and watches no longer show it.
    await until(async () => (await listOperations(b.index, b.store, { filter: '', pageSize: 0, pageToken: '' })).operations.length === 1);
    expect(await reasonOf(waitOperation(b.index, { name: deleted.name, timeoutSeconds: 1 }, callCtx(new AbortController().signal)))).toBe('OPERATION_PURGED');

    // Past the request-id retention: the tombstone goes (once), and the request id is free.
    now += 600_000;
    await until(async () => (await a.index.summaries()).some((s) => s.id === id && s.purgedMs !== undefined));
    await until(async () => (await b.index.summaries()).some((s) => s.id === id && s.purgedMs !== undefined));
    const [p, q] = await Promise.all([ra.sweep(), rb.sweep()]);
    expect(p.requestIds + q.requestIds).toBe(1);
    expect(await reasonOf(a.engine.get(id))).toBe('OPERATION_NOT_FOUND');
    expect((await a.engine.get(operationIdFor('move-2'))).status).toBe(S.OPERATION_STATUS_RUNNING);
    await submitDisk(a.engine, 'delete-1', DOMAIN_A, diskId(1), T.OPERATION_TYPE_DELETE_DISK);
    await until(() => runs === 2);

    open();
    await until(async () => (await a.engine.get(operationIdFor('move-2'))).status === S.OPERATION_STATUS_DONE);
    for (const r of [a, b]) {
      await r.engine.stop();
      r.index.stop();
    }
  });
});

describe('progress', () => {
  test('the throttle writes at most once an interval and keeps the newest value of a burst', async () => {
    // On the fake clock: on a busy machine a stall between two steps of the test could outlast the
    // 100 ms interval and let the value offered after the trailing write through at once.
    jest.useFakeTimers();
    try {
      const written: number[] = [];
      const t = new ProgressThrottle<number>(
        async (v) => void written.push(v),
        () => undefined,
        100,
      );
      for (let i = 1; i <= 10; i++) await t.offer(i);
      expect(written).toEqual([1]);
      await jest.advanceTimersByTimeAsync(99);
      expect(written).toEqual([1]);
      await jest.advanceTimersByTimeAsync(1);
      expect(written).toEqual([1, 10]);
      await t.offer(11);
      await t.close();
      await jest.advanceTimersByTimeAsync(150);
      expect(written).toEqual([1, 10]);
    } finally {
      jest.useRealTimers();
    }
  });

  test("a data step's progress reaches the operation while it runs, also without an overall value", async () => {
    const flows = new Map<pb.OperationType, Flow>([
      [
        T.OPERATION_TYPE_COPY_DISK,
        {
          run: async (ctx) => {
            await ctx.step('copy-volume:x', async (run) => {
              // A job reporting every 20 ms for ~1.5 s, as the data-mover's WatchJob stream does.
              for (let pct = 0; pct <= 100; pct += 1.5) {
                await run.progress({ percent: pct, bytesDone: pct * 1e6, bytesTotal: 100e6, mbps: 75 });
                await new Promise((r) => setTimeout(r, 20));
              }
              return null;
            });
            return undefined;
          },
        },
      ],
    ]);
    const r = replica(new MemoryKvStore(), new MemoryKvStore(), flows, 'r1');
    const op = await submitDisk(r.engine, 'copy', DOMAIN_A, diskId(1), T.OPERATION_TYPE_COPY_DISK);
    const seen: number[] = [];
    for await (const o of watchOperation(r.index, { name: op.name }, callCtx(new AbortController().signal))) seen.push(o.progress?.percent ?? 0);
    const between = seen.filter((p) => p > 0 && p < 100);
    expect(between.length).toBeGreaterThanOrEqual(1);
    expect(seen.at(-1)).toBe(100);
    await r.engine.stop();
    r.index.stop();
  });

  test('progressOfSteps sums the bytes of the data steps', () => {
    const step = (status: pb.OperationStatus, done: number, total: number) =>
      pb.OperationStep.fromPartial({ status, progress: { percent: 0, bytesDone: done, bytesTotal: total, mbps: 10 } });
    expect(progressOfSteps([step(S.OPERATION_STATUS_DONE, 90, 100), step(S.OPERATION_STATUS_RUNNING, 50, 300), pb.OperationStep.fromPartial({})])).toEqual({
      percent: 37.5,
      bytesDone: 150,
      bytesTotal: 400,
      mbps: 10,
    });
  });
});
