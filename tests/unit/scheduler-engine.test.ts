import { pb, SdmeshError } from '@sdmesh/common';
import { engineReplica } from '../harness/scheduler-engine';
import type { Engine, Flow } from '../../services/scheduler/src/engine';
import { derivedUuid, operationIdFor } from '../../services/scheduler/src/ids';
import { MemoryKvStore } from '../../services/scheduler/src/kv-store';
import { LockConflict, LockManager } from '../../services/scheduler/src/locks';
import { isTerminal } from '../../services/scheduler/src/operation-store';

const T = pb.OperationType;

const setup = (flows: Map<pb.OperationType, Flow>, shared?: { ops: MemoryKvStore; locks: MemoryKvStore }, instanceId = 'r1') =>
  engineReplica(flows, { ops: shared?.ops, locks: shared?.locks, instanceId });

const submit = (engine: Engine, requestId: string, entity: string, request: unknown = {}, waitForLocks = false) =>
  engine.submit({
    type: T.OPERATION_TYPE_CREATE_DISK,
    requestId,
    request,
    waitForLocks,
    prepare: async () => ({ params: {}, locks: [{ entity, mode: 'exclusive' }], targetResources: [] }),
  });

async function until(pred: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error('timeout');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('scheduler engine locks', () => {
  test('all-or-nothing, sorted, shared/exclusive, idempotent for the owner', async () => {
    const kv = new MemoryKvStore();
    const locks = new LockManager(kv, async () => false);
    await locks.acquireAll('op1', [
      { entity: 'disk:b', mode: 'exclusive' },
      { entity: 'domain:x', mode: 'shared' },
    ]);
    await locks.acquireAll('op1', [{ entity: 'disk:b', mode: 'exclusive' }]); // again: fine
    await locks.acquireAll('op2', [{ entity: 'domain:x', mode: 'shared' }]); // shared + shared
    // op3 wants a free lock and a held one: gets neither.
    await expect(
      locks.acquireAll('op3', [
        { entity: 'disk:a', mode: 'exclusive' },
        { entity: 'disk:b', mode: 'shared' },
      ]),
    ).rejects.toEqual(new LockConflict('disk:b', 'op1'));
    expect((await locks.list()).map((l) => l.entity).sort()).toEqual(['disk:b', 'domain:x']);
    await expect(locks.acquireAll('op3', [{ entity: 'domain:x', mode: 'exclusive' }])).rejects.toBeInstanceOf(LockConflict);
    await locks.releaseAll('op1', [
      { entity: 'disk:b', mode: 'exclusive' },
      { entity: 'domain:x', mode: 'shared' },
    ]);
    await locks.releaseAll('op2', [{ entity: 'domain:x', mode: 'shared' }]);
    expect(await locks.list()).toEqual([]);
    expect(
      LockManager.normalise([
        { entity: 'b', mode: 'shared' },
        { entity: 'a', mode: 'shared' },
        { entity: 'b', mode: 'exclusive' },
      ]),
    ).toEqual([
      { entity: 'a', mode: 'shared' },
      { entity: 'b', mode: 'exclusive' },
    ]);
  });

  test('a lock left by an ended or vanished operation is taken over', async () => {
    const kv = new MemoryKvStore();
    const stale = new Set(['dead']);
    const locks = new LockManager(kv, async (id) => stale.has(id));
    await locks.acquireAll('dead', [{ entity: 'disk:a', mode: 'exclusive' }]);
    await locks.acquireAll('live', [{ entity: 'disk:a', mode: 'exclusive' }]);
    expect((await locks.list())[0]).toMatchObject({ entity: 'disk:a', exclusive: 'live' });
  });

  test('60 operations taking one domain lock shared at once all get it and all give it back (compare-and-set conflicts are waited out)', async () => {
    // Found by chaos seed 702: 41 snapshots of one domain's disks at once, 3 refused ABORTED LOCK_CONTENTION.
    const kv = new MemoryKvStore();
    // As in the scheduler, whether an owner ended is a read of its operation (an await) inside the compare-and-set.
    const locks = new LockManager(kv, async () => {
      await new Promise((r) => setImmediate(r));
      return false;
    });
    const owners = Array.from({ length: 60 }, (_, i) => `op${i}`);
    const wanted = (o: string) => [
      { entity: 'domain:x', mode: 'shared' as const },
      { entity: `disk:${o}`, mode: 'exclusive' as const },
    ];
    const taken = await Promise.allSettled(owners.map((o) => locks.acquireAll(o, wanted(o))));
    expect(taken.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []))).toEqual([]);
    expect((await locks.list()).find((l) => l.entity === 'domain:x')?.shared.sort()).toEqual([...owners].sort());
    await Promise.all(owners.map((o) => locks.releaseAll(o, wanted(o))));
    expect(await locks.list()).toEqual([]);
  });
});

describe('scheduler engine operations', () => {
  test('ids derive from request ids; the same request returns the same operation; another request with the id is refused', async () => {
    expect(operationIdFor('r')).toBe(operationIdFor('r'));
    expect(operationIdFor('r')).not.toBe(operationIdFor('s'));
    expect(derivedUuid('a', 'b')).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { engine } = setup(
      new Map([
        [
          T.OPERATION_TYPE_CREATE_DISK,
          {
            run: async (ctx) => {
              await ctx.step('wait', () => gate.then(() => 'ok'));
              return undefined;
            },
          },
        ],
      ]),
    );
    const a = await submit(engine, 'req-1', 'disk:1', { x: 1 });
    const b = await submit(engine, 'req-1', 'disk:1', { x: 1 });
    expect(b.name).toBe(a.name);
    await expect(submit(engine, 'req-1', 'disk:1', { x: 2 })).rejects.toMatchObject({ reason: 'REQUEST_ID_REUSED' });
    // Another operation on the same entity: refused naming the first; nothing stored for it.
    const conflict = submit(engine, 'req-2', 'disk:1');
    await expect(conflict).rejects.toMatchObject({ reason: 'LOCKED' });
    await expect(conflict).rejects.toThrow(a.name);
    await expect(engine.get(operationIdFor('req-2'))).rejects.toMatchObject({ reason: 'OPERATION_NOT_FOUND' });
    release();
    await until(async () => (await engine.get(operationIdFor('req-1'))).status === pb.OperationStatus.OPERATION_STATUS_DONE);
    await engine.stop();
  });

  test('wait_for_locks queues the second operation until the first ends', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const order: string[] = [];
    const { engine } = setup(
      new Map([
        [
          T.OPERATION_TYPE_CREATE_DISK,
          {
            run: async (ctx) => {
              await ctx.step('s', async () => {
                order.push(`start ${ctx.rec.op.requestId}`);
                if (ctx.rec.op.requestId === 'first') await gate;
                order.push(`end ${ctx.rec.op.requestId}`);
              });
              return undefined;
            },
          },
        ],
      ]),
    );
    await submit(engine, 'first', 'disk:1');
    const second = await submit(engine, 'second', 'disk:1', {}, true);
    await new Promise((r) => setTimeout(r, 200));
    expect(second.status).toBe(pb.OperationStatus.OPERATION_STATUS_PENDING);
    release();
    await until(async () => (await engine.get(operationIdFor('second'))).status === pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(order).toEqual(['start first', 'end first', 'start second', 'end second']);
    await engine.stop();
  });

  test('a failed flow rolls back, the failure is recorded, locks are released', async () => {
    const rolled: string[] = [];
    const { engine, locks } = setup(
      new Map([
        [
          T.OPERATION_TYPE_CREATE_DISK,
          {
            run: async (ctx) => {
              await ctx.step('one', async () => 1);
              await ctx.step('two', async () => {
                throw new SdmeshError(9, 'the disk is broken', 'BROKEN');
              });
              return undefined;
            },
            rollback: async (ctx) => {
              await ctx.step('rollback:undo', async () => rolled.push('undo'));
            },
          },
        ],
      ]),
    );
    await submit(engine, 'fails', 'disk:9');
    await until(async () => isTerminal((await engine.get(operationIdFor('fails'))).status));
    const op = await engine.get(operationIdFor('fails'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error).toEqual({ code: 9, message: 'the disk is broken', reason: 'BROKEN' });
    expect(op.steps.map((s) => [s.name, pb.operationStatusToJSON(s.status)])).toEqual([
      ['one', 'OPERATION_STATUS_DONE'],
      ['two', 'OPERATION_STATUS_FAILED'],
      ['rollback:undo', 'OPERATION_STATUS_DONE'],
    ]);
    expect(rolled).toEqual(['undo']);
    expect(await locks.list()).toEqual([]);
    await engine.stop();
  });

  test('cancel aborts the running step, rolls back and ends ABORTED', async () => {
    const { engine } = setup(
      new Map([
        [
          T.OPERATION_TYPE_CREATE_DISK,
          {
            run: async (ctx) => {
              await ctx.step('long', () => new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason))));
              return undefined;
            },
            rollback: async (ctx) => {
              await ctx.step('rollback:cleanup', async () => null);
            },
          },
        ],
      ]),
    );
    const op = await submit(engine, 'to-cancel', 'disk:c');
    await until(async () => (await engine.get(op.name.split('/')[1]!)).currentStep === 'long');
    await engine.cancel(op.name.split('/')[1]!);
    await until(async () => isTerminal((await engine.get(op.name.split('/')[1]!)).status));
    const final = await engine.get(op.name.split('/')[1]!);
    expect(final.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
    expect(final.error?.reason).toBe('OPERATION_CANCELLED');
    expect(final.steps.map((s) => s.name)).toEqual(['long', 'rollback:cleanup']);
    await engine.stop();
  });

  test('a replica that stops heartbeating is taken over: the next replica skips the steps already done', async () => {
    const ops = new MemoryKvStore();
    const locksKv = new MemoryKvStore();
    const ran: string[] = [];
    const flow = (who: string, hang: boolean): Flow => ({
      run: async (ctx) => {
        await ctx.step('first', async () => ran.push(`${who}:first`));
        await ctx.step('second', async () => {
          ran.push(`${who}:second`);
          if (hang) await new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
        });
        return undefined;
      },
    });
    const r1 = setup(new Map([[T.OPERATION_TYPE_CREATE_DISK, flow('r1', true)]]), { ops, locks: locksKv }, 'r1');
    r1.engine.start();
    const op = await submit(r1.engine, 'resume-me', 'disk:r');
    const id = op.name.split('/')[1]!;
    await until(async () => (await r1.engine.get(id)).currentStep === 'second');
    await r1.engine.stop(); // as a crash: its heartbeat stops, the operation stays RUNNING
    expect((await r1.engine.get(id)).status).toBe(pb.OperationStatus.OPERATION_STATUS_RUNNING);
    // The replica taking over finds the operation in its operation index, as in the service.
    const r2 = engineReplica(new Map([[T.OPERATION_TYPE_CREATE_DISK, flow('r2', false)]]), { ops, locks: locksKv, instanceId: 'r2', indexed: true });
    r2.engine.start();
    await until(async () => (await r2.engine.get(id)).status === pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(ran).toEqual(['r1:first', 'r1:second', 'r2:second']);
    expect((await r2.store.get(id))!.rec.owner).toBe('r2');
    expect(await r2.locks.list()).toEqual([]);
    await r2.engine.stop();
    r2.index?.stop();
  });
  test.each([
    ['a full read of the bucket', false],
    ['the operation index', true],
  ])(
    'a resume scan never launches an operation twice: not while submit is still taking its locks, not from a stale listing after it ended (candidates from %s)',
    async (_source, indexed) => {
      let runs = 0;
      let finish = () => undefined as void;
      const finished = new Promise<void>((r) => (finish = r));
      const flow: Flow = {
        run: async (ctx) => {
          runs++;
          await ctx.step('only', async () => finished);
          return undefined;
        },
      };
      const r = engineReplica(new Map([[T.OPERATION_TYPE_CREATE_DISK, flow]]), { indexed });
      // submit() stores the record, then takes its locks: hold it there while a scan runs.
      let releaseLocks = () => undefined as void;
      const locksGate = new Promise<void>((res) => (releaseLocks = res));
      const acquireAll = r.locks.acquireAll.bind(r.locks);
      r.locks.acquireAll = async (...args: Parameters<typeof acquireAll>) => {
        await locksGate;
        return acquireAll(...args);
      };
      const submitted = submit(r.engine, 'scan-during-submit', 'disk:s');
      await until(async () => (await r.store.list()).length === 1);
      await r.engine.resumeStale();
      releaseLocks();
      const op = await submitted;
      const id = op.name.split('/')[1]!;
      await until(async () => (await r.engine.get(id)).currentStep === 'only');
      const staleListing = await r.store.list();
      const staleViews = r.index && (await r.index.summaries()).map((v) => ({ ...v }));
      finish();
      await until(async () => (await r.engine.get(id)).status === pb.OperationStatus.OPERATION_STATUS_DONE && r.engine.runningCount() === 0);
      // A scan that read the bucket, or an index that is behind its watch, from before the operation ended.
      r.store.list = async () => staleListing;
      if (r.index && staleViews) r.index.summaries = async () => staleViews;
      await r.engine.resumeStale();
      expect(r.engine.runningCount()).toBe(0);
      expect(runs).toBe(1);
      expect((await r.engine.get(id)).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
      await r.engine.stop();
      r.index?.stop();
    },
  );
});
