import { createLogger, EventPublisher, fail, GrpcStatus, pb, Reason, SdmeshError, StorageRoots, type CallOptions } from '@sdmesh/common';
import { Registry } from 'prom-client';
import { Cluster } from '../../services/scheduler/src/cluster';
import { DomainRegistry, type DomainEntry } from '../../services/scheduler/src/domains';
import { Engine } from '../../services/scheduler/src/engine';
import type { HostRegistry, HostState } from '../../services/scheduler/src/hosts';
import { derivedUuid, operationIdFor } from '../../services/scheduler/src/ids';
import { MemoryKvStore } from '../../services/scheduler/src/kv-store';
import { LockManager } from '../../services/scheduler/src/locks';
import { SchedulerMetrics } from '../../services/scheduler/src/metrics';
import { isTerminal, OperationStore } from '../../services/scheduler/src/operation-store';
import * as ops from '../../services/scheduler/src/operations';
import type { AnyOperationKind, OperationKind, PrepareEnv } from '../../services/scheduler/src/operations';
import { retryPolicies, type FlowSettings } from '../../services/scheduler/src/policies';

/**
 * The operations (services/scheduler/src/operations/) through the seams that exist: a real
 * Engine, OperationStore and LockManager over in-memory KV, and a Cluster whose hosts are fakes
 * answering the metadata-tx, lease-manager and data-mover calls from an in-memory storage.
 */

const log = createLogger('scheduler-ops-test', 'silent', 'test');
const SRC = '11111111-1111-4111-8111-111111111111';
const DST = '22222222-2222-4222-8222-222222222222';
const DISK = '33333333-3333-4333-8333-333333333333';
const BASE = '44444444-4444-4444-8444-444444444444';
const TOP = '55555555-5555-4555-8555-555555555555';

interface Call {
  host: string;
  method: string;
  req: Record<string, unknown>;
  opts: CallOptions | undefined;
}

/** One storage all fake hosts see: images by domain path. */
class FakeStorage {
  readonly images = new Map<string, Map<string, pb.Volume[]>>();
  volumes(domainPath: string, imageId: string): pb.Volume[] {
    return this.images.get(domainPath)?.get(imageId) ?? [];
  }
  add(domainPath: string, imageId: string, v: Partial<pb.Volume>): void {
    const dom = this.images.get(domainPath) ?? new Map<string, pb.Volume[]>();
    this.images.set(domainPath, dom);
    const vols = dom.get(imageId) ?? [];
    if (!vols.some((x) => x.id === v.id))
      vols.push(
        pb.Volume.fromPartial({ imageId, legality: pb.Legality.LEGALITY_LEGAL, capacityBytes: 1 << 20, format: pb.VolumeFormat.VOLUME_FORMAT_RAW, ...v }),
      );
    dom.set(imageId, vols);
  }
}

/** What a test makes a host answer instead of the default (throw to fail the call; undefined: the default). */
type Overrides = Partial<Record<string, (req: Record<string, unknown>, call: number) => unknown>>;

function fakeHost(name: string, storage: FakeStorage, calls: Call[], overrides: Overrides): HostState {
  const counts = new Map<string, number>();
  const answer = (method: string, dflt: (req: Record<string, unknown>) => unknown) => async (req: Record<string, unknown>, opts?: CallOptions) => {
    calls.push({ host: name, method, req, opts });
    const n = (counts.get(method) ?? 0) + 1;
    counts.set(method, n);
    const answered = overrides[method]?.(req, n);
    return answered !== undefined ? answered : dflt(req);
  };
  const volume = (req: Record<string, unknown>) => storage.volumes(req.domainPath as string, req.imageId as string).find((v) => v.id === req.volumeId);
  const metadata = {
    getDomain: answer('getDomain', (r) =>
      pb.StorageDomain.fromPartial({ path: r.path as string, status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE, capacityBytes: 100 << 30, freeBytes: 50 << 30 }),
    ),
    listImages: answer('listImages', (r) => ({ images: [...(storage.images.get(r.domainPath as string)?.keys() ?? [])].map((id) => ({ id, volumes: [] })) })),
    listVolumes: answer('listVolumes', (r) => ({ volumes: storage.volumes(r.domainPath as string, r.imageId as string) })),
    getVolume: answer('getVolume', (r) => ({ volume: volume(r) })),
    createVolume: answer('createVolume', (r) => {
      storage.add(r.domainPath as string, r.imageId as string, {
        id: r.volumeId as string,
        parentId: (r.parentId as string) ?? '',
        legality: r.initiallyIllegal ? pb.Legality.LEGALITY_ILLEGAL : pb.Legality.LEGALITY_LEGAL,
      });
      return {};
    }),
    deleteImage: answer('deleteImage', (r) => {
      storage.images.get(r.domainPath as string)?.delete(r.imageId as string);
      return {};
    }),
    updateVolume: answer('updateVolume', (r) => {
      const v = volume(r)!;
      v.generation += 1;
      return { volume: v };
    }),
    formatDomain: answer('formatDomain', () => ({})),
    finalizeMerge: answer('finalizeMerge', (r) => {
      const vols = storage.volumes(r.domainPath as string, r.imageId as string);
      const gone = vols.find((v) => v.id === r.volumeId)!;
      for (const v of vols) if (v.parentId === gone.id) v.parentId = gone.parentId;
      vols.splice(vols.indexOf(gone), 1);
      return {};
    }),
    fenceOperation: answer('fenceOperation', () => ({})),
    deleteVolume: answer('deleteVolume', (r) => {
      const vols = storage.volumes(r.domainPath as string, r.imageId as string);
      const i = vols.findIndex((v) => v.id === r.volumeId);
      if (i >= 0) vols.splice(i, 1);
      return {};
    }),
    markTemplate: answer('markTemplate', (r) => {
      for (const v of storage.volumes(r.domainPath as string, r.imageId as string)) v.template = true;
      return {};
    }),
  };
  const leases = {
    joinLockspace: answer('joinLockspace', () => ({})),
    leaveLockspace: answer('leaveLockspace', () => ({})),
    getLeaseOwner: answer('getLeaseOwner', () => ({ ownerHostIds: [] })),
    listLockspaceHosts: answer('listLockspaceHosts', () => ({ hosts: [] })),
  };
  const jobs = new Map<string, Record<string, unknown>>();
  const mover = {
    inspectFile: answer('inspectFile', () => ({ format: pb.VolumeFormat.VOLUME_FORMAT_RAW, virtualSizeBytes: 1000, actualSizeBytes: 1000 })),
    copyVolume: answer('copyVolume', (r) => {
      jobs.set(r.jobId as string, r);
      return {};
    }),
    abortJob: answer('abortJob', () => ({})),
    getJob: answer('getJob', () => pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_DONE })),
    // The job's final state: DONE (destination made LEGAL), unless overridden.
    watchJob: (req: { jobId: string }, opts?: CallOptions) => {
      calls.push({ host: name, method: 'watchJob', req, opts });
      const n = (counts.get('watchJob') ?? 0) + 1;
      counts.set('watchJob', n);
      const job = overrides.watchJob
        ? (overrides.watchJob(req, n) as pb.Job)
        : pb.Job.fromPartial({ id: req.jobId, status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 1 });
      if (job.status === pb.JobStatus.JOB_STATUS_DONE) {
        const dest = (jobs.get(req.jobId)!.destination ?? {}) as Record<string, unknown>;
        const v = volume(dest);
        if (v) v.legality = pb.Legality.LEGALITY_LEGAL;
      }
      return (async function* () {
        yield job;
        // A job still running: the stream stays open until the caller stops following it.
        if (job.status === pb.JobStatus.JOB_STATUS_RUNNING)
          await new Promise((_, reject) => opts?.signal?.addEventListener('abort', () => reject(opts.signal!.reason as Error), { once: true }));
      })();
    },
  };
  return {
    spec: { name, hostId: 1, leaseManager: '', metadataTx: '', dataMover: '' },
    clients: { metadata, leases, mover } as unknown as HostState['clients'],
    healthy: true,
    failures: 0,
    load: pb.HostLoad.fromPartial({}),
    lastSeenMs: Date.now(),
    lockspaces: new Map(),
    liveness: new Map(),
    inflight: 0,
    placed: 0,
    announcedDomains: [],
  } as unknown as HostState;
}

/** The parts of HostRegistry the operations use, over fake hosts (one host: placement is trivial). */
function fakeHostRegistry(hosts: HostState[]): HostRegistry {
  const byName = new Map(hosts.map((h) => [h.spec.name, h]));
  const claim = (host: HostState) => ({ host, done: () => undefined });
  const registry = {
    hosts: byName,
    get: (name: string) => byName.get(name),
    healthy: () => hosts.filter((h) => h.healthy),
    reaches: () => true,
    markFailed: (name: string) => {
      byName.get(name)!.healthy = false;
    },
    place: (_kind: string, _domains: string[], exclude: ReadonlySet<string> = new Set()) => {
      const h = hosts.find((x) => x.healthy && !exclude.has(x.spec.name));
      if (!h) throw fail(Reason.NO_HOST, 'no healthy host');
      return claim(h);
    },
    placeOn: (name: string) => claim(byName.get(name)!),
  };
  return registry as unknown as HostRegistry;
}

const settings: FlowSettings = { placementWaitMs: 1500, fenceTimeoutMs: 1500, domainIoTimeoutSeconds: 1, copyRateLimitBytesPerSecond: 0 };

async function setup(overrides: Overrides = {}) {
  const storage = new FakeStorage();
  const calls: Call[] = [];
  const events = new EventPublisher(undefined, { host: 't', service: 'scheduler' });
  const domains = new DomainRegistry(new MemoryKvStore());
  const src: DomainEntry = { id: SRC, name: 'src', path: '/storage/src', warningFreePercent: 10, criticalFreeBytes: 1, createTimeMs: 0 };
  const dst: DomainEntry = { ...src, id: DST, name: 'dst', path: '/storage/dst' };
  await domains.put(src);
  await domains.put(dst);
  storage.add(src.path, DISK, { id: BASE, parentId: '' });
  storage.add(src.path, DISK, { id: TOP, parentId: BASE, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
  const cluster = new Cluster(fakeHostRegistry([fakeHost('host1', storage, calls, overrides)]), domains, events, log);
  const store = new OperationStore(new MemoryKvStore());
  const locks = new LockManager(new MemoryKvStore(), async (id) => {
    const cur = await store.get(id);
    return !cur || isTerminal(cur.rec.op.status);
  });
  const engine = new Engine({
    store,
    locks,
    flows: ops.flowTable({ cluster, settings, policies: retryPolicies(settings) }),
    log,
    events,
    metrics: new SchedulerMetrics(new Registry()),
    instanceId: 'r1',
    beatMs: 50,
    takeoverMs: 5000,
  });
  const deadline = new Date(Date.now() + 20_000);
  const env: PrepareEnv = { cluster, storageRoots: new StorageRoots('/storage', 'test'), call: { deadline, signal: new AbortController().signal } };
  /** Submits as the handler does, then waits for the end. */
  const runToEnd = async <Req extends { requestId: string }, P>(kind: OperationKind<Req, P>, req: Req): Promise<pb.Operation> => {
    const { requestId, ...request } = req;
    await engine.submit({ type: kind.type, requestId, request, waitForLocks: false, prepare: (id) => kind.prepare(env, req, id) });
    const id = operationIdFor(requestId);
    for (const end = Date.now() + 10_000; Date.now() < end; await new Promise((r) => setTimeout(r, 10))) {
      const op = await engine.get(id);
      if (isTerminal(op.status)) return op;
    }
    throw new Error('operation did not end');
  };
  return { storage, calls, env, engine, runToEnd, src, dst, deadline };
}

const names = (calls: Call[]) => calls.map((c) => c.method);

/** A request as the decoder makes it: every field present (zero values), then the test's fields. */
const request = (fields: Record<string, unknown>) =>
  ({
    requestId: 'r',
    format: 0,
    allocation: 0,
    targetFormat: 0,
    collapse: false,
    description: '',
    waitForLocks: false,
    warningFreePercent: 0,
    criticalFreeBytes: 0,
    name: '',
    path: '',
    host: '',
    sourcePath: '',
    ...fields,
  }) as never;

describe('operations: prepare refuses bad requests before anything is stored', () => {
  const cases: Array<[string, AnyOperationKind, Record<string, unknown>, string]> = [
    ['create disk: capacity not a multiple of 512', ops.createDisk, { storageDomainId: SRC, capacityBytes: 1000 }, Reason.INVALID_CAPACITY],
    ['create disk: unknown format', ops.createDisk, { storageDomainId: SRC, capacityBytes: 4096, format: 99 }, Reason.INVALID_FORMAT],
    ['create disk: domain id not a UUID', ops.createDisk, { storageDomainId: 'nope', capacityBytes: 4096 }, Reason.INVALID_DOMAIN_ID],
    ['create disk: unknown domain', ops.createDisk, { storageDomainId: DISK, capacityBytes: 4096 }, Reason.DOMAIN_NOT_FOUND],
    ['delete disk: unknown disk', ops.deleteDisk, { storageDomainId: DST, diskId: DISK }, Reason.DISK_NOT_FOUND],
    ['move disk: same domain', ops.moveDisk, { storageDomainId: SRC, targetStorageDomainId: SRC, diskId: DISK }, Reason.SAME_DOMAIN],
    [
      'copy disk: target_format without collapse',
      ops.copyDisk,
      { storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, targetFormat: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 },
      Reason.INVALID_FORMAT,
    ],
    ['import disk: relative source path', ops.importDisk, { storageDomainId: DST, host: 'host1', sourcePath: 'a/b.raw' }, Reason.INVALID_PATH],
    ['import disk: unknown host', ops.importDisk, { storageDomainId: DST, host: 'host9', sourcePath: '/import/a.raw' }, Reason.HOST_NOT_FOUND],
    ['remove domain: still has a disk', ops.removeStorageDomain, { storageDomainId: SRC }, Reason.DOMAIN_NOT_EMPTY],
    ['create domain: threshold out of range', ops.createStorageDomain, { name: 'd', path: '/storage/new', warningFreePercent: 100 }, Reason.INVALID_THRESHOLD],
  ];
  test.each(cases)('%s', async (_what, kind, req, reason) => {
    const { env } = await setup();
    await expect(kind.prepare(env, request(req), 'op-1')).rejects.toMatchObject({ reason });
  });

  test('an ILLEGAL volume refuses snapshot, copy and move', async () => {
    const { env, storage, src } = await setup();
    storage.volumes(src.path, DISK)[1]!.legality = pb.Legality.LEGALITY_ILLEGAL;
    for (const kind of [ops.snapshotDisk, ops.copyDisk, ops.moveDisk] as AnyOperationKind[]) {
      await expect(kind.prepare(env, request({ storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }), 'op-1')).rejects.toMatchObject({
        reason: Reason.DISK_ILLEGAL,
      });
    }
  });
});

describe('operations: locks are declared as data', () => {
  const cases: Array<[string, AnyOperationKind, Record<string, unknown>, (targetDisk: string) => Array<[string, string]>]> = [
    [
      'create disk',
      ops.createDisk,
      { storageDomainId: SRC, capacityBytes: 4096 },
      (d) => [
        [`disk:${d}`, 'exclusive'],
        [`domain:${SRC}`, 'shared'],
      ],
    ],
    [
      'delete disk',
      ops.deleteDisk,
      { storageDomainId: SRC, diskId: DISK },
      () => [
        [`disk:${DISK}`, 'exclusive'],
        [`domain:${SRC}`, 'shared'],
      ],
    ],
    [
      'copy disk',
      ops.copyDisk,
      { storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK },
      (d) => [
        [`disk:${DISK}`, 'shared'],
        [`disk:${d}`, 'exclusive'],
        [`domain:${SRC}`, 'shared'],
        [`domain:${DST}`, 'shared'],
      ],
    ],
    [
      'move disk',
      ops.moveDisk,
      { storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK },
      () => [
        [`disk:${DISK}`, 'exclusive'],
        [`domain:${SRC}`, 'shared'],
        [`domain:${DST}`, 'shared'],
      ],
    ],
    ['remove domain', ops.removeStorageDomain, { storageDomainId: DST }, () => [[`domain:${DST}`, 'exclusive']]],
  ];
  test.each(cases)('%s', async (_what, kind, req, expected) => {
    const { env } = await setup();
    const prepared = await kind.prepare(env, request(req), 'op-1');
    const targetDisk = (prepared.params as { diskId?: string; targetDiskId?: string }).targetDiskId ?? (prepared.params as { diskId?: string }).diskId ?? '';
    expect(prepared.locks.map((l) => [l.entity, l.mode])).toEqual(expected(targetDisk));
  });

  test('prepare passes the incoming deadline and signal on to the hosts it asks', async () => {
    const { env, calls, deadline } = await setup();
    await ops.moveDisk.prepare(env, pb.MoveDiskRequest.fromPartial({ requestId: 'r', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }), 'op-1');
    expect(calls.length).toBeGreaterThan(0);
    for (const c of calls) {
      expect(c.opts?.deadline).toBe(deadline);
      expect(c.opts?.signal).toBe(env.call.signal);
      expect(c.opts?.timeoutMs).toBeGreaterThan(0);
    }
  });
});

describe('operations: run, rollback, retries', () => {
  test('move disk: target chain created base first, then every volume copied at once, source deleted; every call bounded', async () => {
    const { runToEnd, calls, storage, src, dst } = await setup();
    const op = await runToEnd(
      ops.moveDisk,
      pb.MoveDiskRequest.fromPartial({ requestId: 'move-1', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(op.steps.map((s) => s.name)).toEqual([
      'inspect-source',
      `create-target:${BASE}`,
      `create-target:${TOP}`,
      `copy-volume:${BASE}`,
      `copy-volume:${TOP}`,
      'delete-source',
    ]);
    // Every target volume exists (ILLEGAL) before any data moves, the child created on its parent.
    const firstCopy = calls.findIndex((c) => c.method === 'copyVolume');
    expect(
      calls
        .slice(0, firstCopy)
        .filter((c) => c.method === 'createVolume')
        .map((c) => [c.req.volumeId, c.req.parentId, c.req.initiallyIllegal]),
    ).toEqual([
      [BASE, '', true],
      [TOP, BASE, true],
    ]);
    expect(storage.volumes(src.path, DISK)).toEqual([]);
    expect(storage.volumes(dst.path, DISK).map((v) => [v.id, v.legality])).toEqual([
      [BASE, pb.Legality.LEGALITY_LEGAL],
      [TOP, pb.Legality.LEGALITY_LEGAL],
    ]);
    expect(
      calls
        .filter((c) => c.method === 'copyVolume')
        .map((c) => (c.req.destination as { volumeId: string }).volumeId)
        .sort(),
    ).toEqual([BASE, TOP].sort());
    // Every unary call has a deadline; the job stream is bounded by the operation's signal.
    for (const c of calls) {
      if (c.method === 'watchJob') expect(c.opts?.signal).toBeDefined();
      else expect(c.opts?.timeoutMs ?? c.opts?.deadline).toBeDefined();
    }
  });

  test('copy disk: a job failing for a data reason fails the operation with that reason and deletes the target', async () => {
    const { runToEnd, calls, storage, dst } = await setup({
      watchJob: () =>
        pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 13, reason: Reason.QEMU_IMG_FAILED, message: 'qemu-img: boom' } }),
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-1', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error).toMatchObject({ reason: Reason.QEMU_IMG_FAILED });
    expect(op.steps.map((s) => s.name)).toContain('rollback:delete-target');
    // One job per volume (both run at once), neither retried.
    const destinations = calls.filter((c) => c.method === 'copyVolume').map((c) => (c.req.destination as { volumeId: string }).volumeId);
    expect(new Set(destinations).size).toBe(2);
    expect(destinations).toHaveLength(2);
    expect(storage.images.get(dst.path)?.size ?? 0).toBe(0);
  });

  test('copy disk: one volume copy failing stops the other one at once; the rollback aborts its job and deletes the target', async () => {
    let abortedJobs: string[] = [];
    const baseTarget = derivedUuid(operationIdFor('copy-sibling-fails'), `volume:${BASE}`);
    const { runToEnd, calls, storage, dst } = await setup({
      // The base's job fails; the top's job never ends by itself.
      watchJob: (req) =>
        (req.jobId as string).includes(`.${baseTarget}.`)
          ? pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 13, reason: Reason.QEMU_IMG_FAILED, message: 'qemu-img: boom' } })
          : pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_RUNNING }),
      abortJob: (req) => {
        abortedJobs = [...abortedJobs, req.jobId as string];
        return {};
      },
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-sibling-fails', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error).toMatchObject({ reason: Reason.QEMU_IMG_FAILED });
    const copies = op.steps.filter((s) => s.name.startsWith('copy-volume:'));
    expect(copies.map((s) => s.status)).toEqual([pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_FAILED]);
    expect(copies[1]!.error?.message).toMatch(/another volume copy of this operation failed/);
    // Both jobs were started, the still-running one aborted by the rollback, the target gone.
    const jobIds = calls.filter((c) => c.method === 'copyVolume').map((c) => c.req.jobId as string);
    expect(jobIds).toHaveLength(2);
    expect(abortedJobs.sort()).toEqual([...jobIds].sort());
    expect(storage.images.get(dst.path)?.size ?? 0).toBe(0);
  });

  test('copy disk: a job that committed but whose answer was lost (found LEGAL before a retry) is not run again', async () => {
    const { runToEnd, calls, storage, dst } = await setup({
      copyVolume: (req, n) => {
        if (n > 1) return undefined;
        // The job ran to its end (destination LEGAL), then its data-mover restarted and forgot it.
        const ref = req.destination as { imageId: string; volumeId: string };
        storage.volumes(dst.path, ref.imageId).find((v) => v.id === ref.volumeId)!.legality = pb.Legality.LEGALITY_LEGAL;
        throw fail(Reason.GENERATION_MISMATCH, 'volume is at generation 1, the request expected 0');
      },
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-committed-lost', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, collapse: true }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(calls.filter((c) => c.method === 'copyVolume')).toHaveLength(1);
    expect(calls.filter((c) => c.method === 'updateVolume').map((c) => c.req.bumpGeneration)).toEqual([true]);
  });

  test.each([
    [Reason.ACQUIRE_FAILED, 'cannot acquire lease "SDM": sanlock: no space (ENOSPC) (-28)'],
    [Reason.JOIN_FAILED, 'cannot join lockspace as host id 1: try again'],
  ])('copy disk: a rollback refused %s (its host had lost the lockspace: chaos seeds 21, 23) is retried until the target is gone', async (reason, message) => {
    const { runToEnd, calls, storage, dst } = await setup({
      watchJob: () =>
        pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 13, reason: Reason.QEMU_IMG_FAILED, message: 'qemu-img: boom' } }),
      deleteImage: (_req, n) => {
        if (n === 1) throw fail(reason, message);
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-rollback-retried', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error?.message).not.toMatch(/rollback incomplete/);
    expect(names(calls).filter((m) => m === 'deleteImage')).toHaveLength(2);
    expect(storage.images.get(dst.path)?.size ?? 0).toBe(0);
  });

  test('move disk: a delete-source refused ACQUIRE_FAILED after it had deleted the source (chaos seed 24) is tried again, and the move ends DONE', async () => {
    const { runToEnd, calls, storage, src, dst } = await setup({
      deleteImage: (req, n) => {
        if (req.domainPath === '/storage/src' && n === 1) {
          storage.images.get(src.path)?.delete(req.imageId as string);
          throw fail(Reason.ACQUIRE_FAILED, 'cannot acquire lease "SDM": no space (ENOSPC) (-28)');
        }
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.moveDisk,
      pb.MoveDiskRequest.fromPartial({ requestId: 'move-retried', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(names(calls).filter((m) => m === 'deleteImage')).toHaveLength(2);
    expect(storage.volumes(dst.path, DISK).map((v) => v.id)).toEqual([BASE, TOP]);
  });

  test('move disk: a rollback after the source was deleted keeps the target, the only copy of the disk (chaos seed 24 lost one)', async () => {
    const { runToEnd, storage, src, dst } = await setup({
      deleteImage: (req) => {
        if (req.domainPath === '/storage/src') {
          storage.images.get(src.path)?.delete(req.imageId as string);
          throw fail(Reason.ACQUIRE_FAILED, 'cannot acquire lease "SDM": no space (ENOSPC) (-28)');
        }
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.moveDisk,
      pb.MoveDiskRequest.fromPartial({ requestId: 'move-kept', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(storage.volumes(src.path, DISK)).toEqual([]);
    expect(storage.volumes(dst.path, DISK).map((v) => v.id)).toEqual([BASE, TOP]);
  });

  test('copy disk: a job refused GENERATION_MISMATCH (another replica fenced the destination and died: chaos seed 23) is fenced and run again', async () => {
    const { runToEnd, calls } = await setup({
      watchJob: (_req, n) =>
        n === 1
          ? pb.Job.fromPartial({
              status: pb.JobStatus.JOB_STATUS_FAILED,
              error: { code: 9, reason: Reason.GENERATION_MISMATCH, message: 'volume is at generation 3, the request expected 1' },
            })
          : pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 4 }),
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-genmismatch', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, collapse: true }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(calls.filter((c) => c.method === 'copyVolume')).toHaveLength(2);
    expect(calls.filter((c) => c.method === 'updateVolume').map((c) => c.req.bumpGeneration)).toEqual([true]);
  });

  test('copy disk: a job refused GENERATION_MISMATCH at its start (a restarted data-mover forgot it had finished: chaos seed 31) is fenced and run again', async () => {
    const { runToEnd, calls } = await setup({
      copyVolume: (_req, n) => {
        if (n === 1) throw fail(Reason.GENERATION_MISMATCH, 'volume is at generation 2, the request expected 1');
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-start-genmismatch', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, collapse: true }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(calls.filter((c) => c.method === 'copyVolume')).toHaveLength(2);
    expect(calls.filter((c) => c.method === 'updateVolume').map((c) => c.req.bumpGeneration)).toEqual([true]);
  });

  test('copy disk: a job that lost its lease is fenced (generation bumped) and run again', async () => {
    const { runToEnd, calls } = await setup({
      watchJob: (_req, n) =>
        n === 1
          ? pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 10, reason: Reason.LEASE_LOST, message: 'lost' } })
          : pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 2 }),
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-2', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, collapse: true }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const jobIds = calls.filter((c) => c.method === 'copyVolume').map((c) => c.req.jobId as string);
    expect(jobIds).toHaveLength(2);
    expect(jobIds[1]).not.toBe(jobIds[0]);
    expect(calls.filter((c) => c.method === 'updateVolume').map((c) => c.req.bumpGeneration)).toEqual([true]);
  });

  test('copy disk: a fence refused LOCKSPACE_NOT_JOINED (the answering host lost its lockspace: chaos seed 48) is tried again, and the copy ends DONE', async () => {
    const { runToEnd, calls } = await setup({
      watchJob: (_req, n) =>
        n === 1
          ? pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 10, reason: Reason.LEASE_LOST, message: 'lost' } })
          : pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 2 }),
      updateVolume: (req, n) => {
        if (req.bumpGeneration && n === 1) throw fail(Reason.LOCKSPACE_NOT_JOINED, "lockspace is not joined in this host's sanlock daemon (lost or failed)");
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-fence-lockspace', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK, collapse: true }),
    );
    expect({ status: op.status, error: op.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    expect(calls.filter((c) => c.method === 'updateVolume').map((c) => c.req.bumpGeneration)).toEqual([true, true]);
    expect(calls.filter((c) => c.method === 'copyVolume')).toHaveLength(2);
  });

  const retryCases: Array<[string, SdmeshError, boolean]> = [
    ['lease held by another transaction of this host: retried', fail(Reason.LEASE_HELD_ON_THIS_HOST, 'busy here'), true],
    ['lease held by another host: not retried', fail(Reason.LEASE_HELD, 'held by host2'), false],
    ['domain not active: not retried', fail(Reason.DOMAIN_NOT_ACTIVE, 'being removed'), false],
  ];
  test.each(retryCases)('create disk: %s', async (_what, firstError, retried) => {
    const { runToEnd, calls } = await setup({
      createVolume: (_req, n) => {
        if (n === 1) throw firstError;
        return undefined;
      },
    });
    const op = await runToEnd(
      ops.createDisk,
      pb.CreateDiskRequest.fromPartial({ requestId: `create-${firstError.reason}`, storageDomainId: SRC, capacityBytes: 4096 }),
    );
    expect(names(calls).filter((m) => m === 'createVolume')).toHaveLength(retried ? 2 : 1);
    if (retried) expect({ status: op.status, error: op.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    else expect(op.error).toMatchObject({ reason: firstError.reason });
  });
});

describe('operations: templates and thin clones', () => {
  const TMPL = '66666666-6666-4666-8666-666666666666';
  const TV = '77777777-7777-4777-8777-777777777777';
  const withTemplate = async () => {
    const t = await setup();
    t.storage.add(t.src.path, TMPL, { id: TV, parentId: '', template: true });
    return t;
  };
  const clone = (fields: Record<string, unknown>) => request({ storageDomainId: SRC, templateDiskId: TMPL, mode: 0, targetStorageDomainId: '', ...fields });

  test('clone: the template locked shared, the new disk exclusive; thin = one CreateVolume naming the template volume and image', async () => {
    const { env, runToEnd, calls } = await withTemplate();
    const prepared = await ops.cloneDisk.prepare(env, clone({}), 'op-1');
    const newDisk = (prepared.params as { targetDiskId: string }).targetDiskId;
    expect(prepared.locks.map((l) => [l.entity, l.mode])).toEqual([
      [`disk:${TMPL}`, 'shared'],
      [`disk:${newDisk}`, 'exclusive'],
      [`domain:${SRC}`, 'shared'],
    ]);
    const op = await runToEnd(ops.cloneDisk, pb.CloneDiskRequest.fromPartial({ requestId: 'thin-1', storageDomainId: SRC, templateDiskId: TMPL }));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const creates = calls.filter((c) => c.method === 'createVolume').map((c) => [c.req.parentId, c.req.parentImageId, c.req.format, c.req.imageId === TMPL]);
    expect(creates).toEqual([[TV, TMPL, pb.VolumeFormat.VOLUME_FORMAT_QCOW2, false]]);
    expect(names(calls)).not.toContain('copyVolume');
  });

  test('full clone: the copy path (an ILLEGAL target filled by a copy job), into another domain', async () => {
    const { runToEnd, calls } = await withTemplate();
    const op = await runToEnd(
      ops.cloneDisk,
      pb.CloneDiskRequest.fromPartial({
        requestId: 'full-1',
        storageDomainId: SRC,
        templateDiskId: TMPL,
        mode: pb.CloneMode.CLONE_MODE_FULL,
        targetStorageDomainId: DST,
      }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const create = calls.find((c) => c.method === 'createVolume')!;
    expect([create.req.domainPath, create.req.parentImageId ?? '', create.req.initiallyIllegal]).toEqual(['/storage/dst', '', true]);
    expect(names(calls)).toContain('copyVolume');
  });

  test('mark template: its closing read is tried again while no host answers (chaos seed 22: the step committed, the read failed, the operation FAILED)', async () => {
    const { runToEnd, calls, storage, src } = await setup({
      // Call 1 is the request's check; call 2, the closing read, meets every metadata-tx down.
      listVolumes: (_req, n) => {
        if (n === 2) throw new SdmeshError(GrpcStatus.UNAVAILABLE, 'Connection dropped');
        return undefined;
      },
    });
    storage.add(src.path, TMPL, { id: TV, parentId: '' });
    const op = await runToEnd(ops.markDiskTemplate, pb.MarkDiskTemplateRequest.fromPartial({ requestId: 'mark-read', storageDomainId: SRC, diskId: TMPL }));
    expect([op.status, op.result?.$case === 'disk' && op.result.disk.template]).toEqual([pb.OperationStatus.OPERATION_STATUS_DONE, true]);
    expect(names(calls).filter((m) => m === 'listVolumes')).toHaveLength(3);
  });

  test('mark template: its closing read waits while no host is healthy (the CI chaos run, seed 16: a MoveDisk FAILED NO_HOST, its disk moved)', async () => {
    const shared: { env?: PrepareEnv } = {};
    const { env, runToEnd, storage, src } = await setup({
      // Every host is marked down right after the step committed; one is healthy again 300 ms later.
      markTemplate: () => {
        const host = shared.env!.cluster.hosts.get('host1')!;
        host.healthy = false;
        setTimeout(() => (host.healthy = true), 300);
        return undefined;
      },
    });
    shared.env = env;
    storage.add(src.path, TMPL, { id: TV, parentId: '' });
    const op = await runToEnd(ops.markDiskTemplate, pb.MarkDiskTemplateRequest.fromPartial({ requestId: 'mark-nohost', storageDomainId: SRC, diskId: TMPL }));
    expect([op.status, op.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_DONE, undefined]);
  });

  test('mark template: one MarkTemplate step; a template then refuses snapshot, move and delete with clones; a clone refuses chain copies', async () => {
    // ListImages with the volumes (the default fake lists ids only): deleting a template counts its clones.
    const shared: { storage?: FakeStorage } = {};
    const { env, runToEnd, calls, storage, src } = await setup({
      listImages: (r) => ({
        images: [...(shared.storage!.images.get(r.domainPath as string) ?? new Map<string, pb.Volume[]>()).entries()].map(([id, volumes]) => ({ id, volumes })),
      }),
    });
    shared.storage = storage;
    storage.add(src.path, TMPL, { id: TV, parentId: '' });
    const op = await runToEnd(ops.markDiskTemplate, pb.MarkDiskTemplateRequest.fromPartial({ requestId: 'mark-1', storageDomainId: SRC, diskId: TMPL }));
    expect([op.status, op.result?.$case === 'disk' && op.result.disk.template]).toEqual([pb.OperationStatus.OPERATION_STATUS_DONE, true]);
    expect(names(calls).filter((m) => m === 'markTemplate')).toHaveLength(1);
    for (const kind of [ops.snapshotDisk, ops.moveDisk] as AnyOperationKind[]) {
      await expect(kind.prepare(env, request({ storageDomainId: SRC, targetStorageDomainId: DST, diskId: TMPL }), 'op-2')).rejects.toMatchObject({
        reason: Reason.DISK_IS_TEMPLATE,
      });
    }
    storage.add(src.path, '88888888-8888-4888-8888-888888888888', { id: '99999999-9999-4999-8999-999999999999', parentId: TV, parentImageId: TMPL });
    await expect(ops.deleteDisk.prepare(env, request({ storageDomainId: SRC, diskId: TMPL }), 'op-3')).rejects.toMatchObject({
      reason: Reason.TEMPLATE_HAS_CLONES,
      message: expect.stringMatching(/1 thin clone/),
    });
    // A clone moves or copies only flattened.
    for (const kind of [ops.moveDisk, ops.copyDisk] as AnyOperationKind[]) {
      await expect(
        kind.prepare(env, request({ storageDomainId: SRC, targetStorageDomainId: DST, diskId: '88888888-8888-4888-8888-888888888888' }), 'op-4'),
      ).rejects.toMatchObject({ reason: Reason.DISK_IS_CLONE });
    }
  });

  const refusals: Array<[string, AnyOperationKind, Record<string, unknown>, string]> = [
    ['clone: not a template', ops.cloneDisk, { templateDiskId: DISK }, Reason.NOT_A_TEMPLATE],
    ['clone: thin into another domain', ops.cloneDisk, { targetStorageDomainId: DST }, Reason.THIN_CLONE_OTHER_DOMAIN],
    ['clone: unknown mode', ops.cloneDisk, { mode: 9 }, Reason.INVALID_CLONE_MODE],
    ['clone: unknown template', ops.cloneDisk, { templateDiskId: BASE }, Reason.DISK_NOT_FOUND],
    ['mark: a chain', ops.markDiskTemplate, { diskId: DISK }, Reason.TEMPLATE_NOT_SINGLE_VOLUME],
  ];
  test.each(refusals)('%s', async (_what, kind, req, reason) => {
    const { env } = await withTemplate();
    await expect(kind.prepare(env, clone(req), 'op-1')).rejects.toMatchObject({ reason });
  });
});

describe('operations: delete snapshot (merge)', () => {
  const LEAF = '88888888-8888-4888-8888-888888888888';
  const chain3 = async () => {
    const t = await setup();
    t.storage.add(t.src.path, DISK, { id: LEAF, parentId: TOP, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    return t;
  };
  const req = (volumeId: string, requestId = 'del-snap') => pb.DeleteSnapshotRequest.fromPartial({ requestId, storageDomainId: SRC, diskId: DISK, volumeId });

  test('refusals before anything is stored: unknown volume, the only volume, another ILLEGAL volume, a bad id', async () => {
    const { env, storage, src } = await chain3();
    await expect(ops.deleteSnapshot.prepare(env, req(SRC), 'op-1')).rejects.toMatchObject({ reason: Reason.VOLUME_NOT_FOUND });
    await expect(ops.deleteSnapshot.prepare(env, req('../x'), 'op-1')).rejects.toMatchObject({ reason: Reason.INVALID_ID });
    storage.volumes(src.path, DISK)[2]!.legality = pb.Legality.LEGALITY_ILLEGAL;
    await expect(ops.deleteSnapshot.prepare(env, req(BASE), 'op-1')).rejects.toMatchObject({ reason: Reason.DISK_ILLEGAL });
    // The merge's own target ILLEGAL (an interrupted merge of this volume): accepted, to finish it.
    await expect(ops.deleteSnapshot.prepare(env, req(LEAF), 'op-1')).resolves.toMatchObject({
      locks: [
        { entity: `disk:${DISK}`, mode: 'exclusive' },
        { entity: `domain:${SRC}`, mode: 'shared' },
      ],
    });
    storage.images.get(src.path)!.set(DST, [pb.Volume.fromPartial({ id: BASE, imageId: DST, legality: pb.Legality.LEGALITY_LEGAL })]);
    await expect(ops.deleteSnapshot.prepare(env, { ...req(BASE), diskId: DST }, 'op-1')).rejects.toMatchObject({ reason: Reason.ONLY_VOLUME });
  });

  test('an internal volume: one merge job into its parent, then the finalize with the generation the job left', async () => {
    const { runToEnd, calls, storage, src } = await chain3();
    const op = await runToEnd(ops.deleteSnapshot, req(TOP));
    expect({ status: op.status, error: op.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    expect(op.steps.map((s) => s.name)).toEqual(['inspect-chain', `merge-volume:${TOP}`, 'finalize-merge']);
    const job = calls.find((c) => c.method === 'copyVolume')!.req;
    expect(job).toMatchObject({ merge: true, collapse: false, source: { volumeId: TOP }, destination: { volumeId: BASE } });
    expect(calls.find((c) => c.method === 'finalizeMerge')!.req).toMatchObject({ volumeId: TOP, targetId: BASE, targetGeneration: 1 });
    expect(storage.volumes(src.path, DISK).map((v) => [v.id, v.parentId])).toEqual([
      [BASE, ''],
      [LEAF, BASE],
    ]);
  });

  test('the base merges into its child; a merge whose finalize began (the volume ILLEGAL) only finalizes', async () => {
    const t = await chain3();
    await t.runToEnd(ops.deleteSnapshot, req(BASE, 'del-base'));
    expect(t.calls.find((c) => c.method === 'copyVolume')!.req).toMatchObject({ merge: true, source: { volumeId: BASE }, destination: { volumeId: TOP } });

    const u = await chain3();
    const vols = u.storage.volumes(u.src.path, DISK);
    vols[1]!.legality = pb.Legality.LEGALITY_ILLEGAL;
    vols[0]!.generation = 4;
    const op = await u.runToEnd(ops.deleteSnapshot, req(TOP, 'del-resume'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(names(u.calls)).not.toContain('copyVolume');
    expect(u.calls.find((c) => c.method === 'finalizeMerge')!.req).toMatchObject({ volumeId: TOP, targetId: BASE, targetGeneration: 4 });
  });
});

describe('domain lifecycle: deactivate, activate, remove with keep_data, attach', () => {
  const LEFT = pb.Lockspace.fromPartial({ state: pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED });
  // Hosts leave when told; the domain records read back their own ids.
  const leaves: Overrides = {
    leaveLockspace: () => LEFT,
    getDomain: (r) =>
      pb.StorageDomain.fromPartial({ id: r.path === '/storage/dst' ? DST : SRC, path: r.path as string, status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE }),
  };
  const entryOf = (env: PrepareEnv, id: string) => env.cluster.domains.get(id);

  test('deactivate: marked with a new epoch, every host leaves with it; operations on the domain refused; activate joins with a newer one', async () => {
    const t = await setup(leaves);
    const before = await entryOf(t.env, DST);
    const op = await t.runToEnd(ops.deactivateStorageDomain, request({ requestId: 'deact', storageDomainId: DST }));
    expect(op.steps.map((s) => s.name)).toEqual(['mark-maintenance', 'leave-lockspaces']);
    const marked = await entryOf(t.env, DST);
    expect(marked.maintenance).toBe(true);
    expect(marked.epochMs).toBeGreaterThan(before.createTimeMs);
    expect(t.calls.filter((c) => c.method === 'leaveLockspace').map((c) => c.req)).toEqual([{ lockspace: DST, wait: true, epoch: marked.epochMs }]);
    for (const [kind, req] of [
      [ops.createDisk, { storageDomainId: DST, capacityBytes: 4096 }],
      [ops.copyDisk, { storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }],
      [ops.deactivateStorageDomain, { storageDomainId: DST }],
    ] as Array<[AnyOperationKind, Record<string, unknown>]>) {
      await expect(kind.prepare(t.env, request(req), 'op-x')).rejects.toMatchObject({ reason: Reason.DOMAIN_IN_MAINTENANCE });
    }
    const act = await t.runToEnd(ops.activateStorageDomain, request({ requestId: 'act', storageDomainId: DST }));
    expect(act.steps.map((s) => s.name)).toEqual(['check-storage', 'mark-active', 'connect-hosts']);
    const active = await entryOf(t.env, DST);
    expect(active.maintenance).toBe(false);
    expect(active.epochMs).toBeGreaterThan(marked.epochMs!);
    expect(t.calls.filter((c) => c.method === 'joinLockspace').map((c) => c.req)).toEqual([
      { lockspace: DST, path: '/storage/dst/dom_md/ids', wait: false, epoch: active.epochMs },
    ]);
    await expect(ops.activateStorageDomain.prepare(t.env, request({ storageDomainId: DST }), 'op-y')).rejects.toMatchObject({
      reason: Reason.DOMAIN_ALREADY_ACTIVE,
    });
  });

  test('a host that does not leave fails the step LEAVE_INCOMPLETE naming it; the domain stays flagged', async () => {
    const t = await setup({ leaveLockspace: () => pb.Lockspace.fromPartial({ state: pb.LockspaceState.LOCKSPACE_STATE_JOINED }) });
    const saved = settings.lockspaceLeaveMs;
    settings.lockspaceLeaveMs = 1200;
    try {
      const op = await t.runToEnd(ops.deactivateStorageDomain, request({ requestId: 'deact-stuck', storageDomainId: DST }));
      expect([op.status, op.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_FAILED, Reason.LEAVE_INCOMPLETE]);
      expect(op.error?.message).toBe(`not every host left the lockspace: host1 (${DST}): the lockspace is still JOINED`);
      expect(t.calls.filter((c) => c.method === 'leaveLockspace').length).toBeGreaterThan(1);
      expect((await entryOf(t.env, DST)).maintenance).toBe(true);
    } finally {
      settings.lockspaceLeaveMs = saved;
    }
  });

  test('remove with keep_data detaches a domain that has disks; a record of it stays for the poll; attach adopts it again by its id', async () => {
    const t = await setup(leaves);
    await expect(ops.removeStorageDomain.prepare(t.env, request({ storageDomainId: SRC }), 'op-1')).rejects.toMatchObject({ reason: Reason.DOMAIN_NOT_EMPTY });
    const op = await t.runToEnd(ops.removeStorageDomain, request({ requestId: 'detach', storageDomainId: SRC, keepData: true }));
    expect(op.steps.map((s) => s.name)).toEqual(['mark-removing', 'leave-lockspaces', 'unregister-domain']);
    expect(await t.env.cluster.domains.find(SRC)).toBeUndefined();
    const [removed] = await t.env.cluster.domains.removed();
    expect(removed).toMatchObject({ id: SRC, path: t.src.path });
    expect(await t.env.cluster.domains.leaveOrders()).toEqual([{ id: SRC, epochMs: removed!.epochMs }]);

    // The domain record as a host reads it from storage: its own id and name.
    const stored = pb.StorageDomain.fromPartial({ id: SRC, name: 'src', path: t.src.path, status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE, volumeCount: 2 });
    const u = await setup({ ...leaves, getDomain: () => stored });
    await u.env.cluster.domains.removeLeavingRecord(await entryOf(u.env, SRC));
    const attached = await u.runToEnd(ops.attachStorageDomain, request({ requestId: 'attach', path: t.src.path }));
    expect(attached.steps.map((s) => s.name)).toEqual(['inventory', 'epoch', 'register-domain', 'connect-hosts']);
    expect(await entryOf(u.env, SRC)).toMatchObject({ id: SRC, name: 'src', path: t.src.path });
    expect(await u.env.cluster.domains.removed()).toEqual([]);
    expect(u.calls.find((c) => c.method === 'joinLockspace')!.req).toMatchObject({ lockspace: SRC });
    // Attached again (same id elsewhere), or a record claiming more volumes than any domain has lease slots: refused.
    await expect(ops.attachStorageDomain.prepare(u.env, request({ path: '/storage/copy' }), 'op-2')).rejects.toMatchObject({ reason: Reason.DOMAIN_ID_IN_USE });
    const v = await setup({ getDomain: () => ({ ...stored, id: '66666666-6666-4666-8666-666666666666', volumeCount: 1e6 }) });
    await expect(ops.attachStorageDomain.prepare(v.env, request({ path: '/storage/huge' }), 'op-3')).rejects.toMatchObject({
      reason: Reason.DOMAIN_UNREADABLE,
    });
  });
});

describe('operations: create disk rollback', () => {
  const create = (requestId: string) => pb.CreateDiskRequest.fromPartial({ requestId, storageDomainId: SRC, capacityBytes: 1 << 20 });
  const diskOf = (requestId: string) => derivedUuid(operationIdFor(requestId), 'disk');
  /** Overrides whose answers need the storage setup() makes. */
  const withStorage = async (make: (storage: () => FakeStorage) => Overrides) => {
    const made: { storage?: FakeStorage } = {};
    const t = await setup(make(() => made.storage!));
    made.storage = t.storage;
    return t;
  };
  /** CreateVolume commits, then fails (its answer lost, the retry refused for a reason not retried). */
  const commitsThenFails = (storage: () => FakeStorage) => (req: Record<string, unknown>) => {
    storage().add(req.domainPath as string, req.imageId as string, { id: req.volumeId as string });
    throw fail(Reason.QEMU_IMG_FAILED, 'qemu-img: boom after the commit');
  };

  test('a create that failed after it committed deletes the disk it made: nothing listed, the failure kept', async () => {
    const t = await withStorage((storage) => ({ createVolume: commitsThenFails(storage) }));
    const op = await t.runToEnd(ops.createDisk, create('create-fails'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error).toMatchObject({ reason: Reason.QEMU_IMG_FAILED });
    expect(op.error?.message).not.toMatch(/rollback incomplete/);
    expect(op.steps.map((s) => s.name)).toEqual(['create-volume', 'rollback:delete-disk']);
    expect(names(t.calls).filter((m) => m === 'deleteImage')).toHaveLength(1);
    expect(t.storage.volumes(t.src.path, diskOf('create-fails'))).toEqual([]);
    expect(t.storage.volumes(t.src.path, DISK).map((v) => v.id)).toEqual([BASE, TOP]); // another disk: untouched
  });

  test('its rollback refused ACQUIRE_FAILED (the host had lost the lockspace) is retried until the disk is gone', async () => {
    const t = await withStorage((storage) => ({
      createVolume: commitsThenFails(storage),
      deleteImage: (_req, n) => {
        if (n === 1) throw fail(Reason.ACQUIRE_FAILED, 'cannot acquire lease "SDM": sanlock: no space (ENOSPC) (-28)');
        return undefined;
      },
    }));
    const op = await t.runToEnd(ops.createDisk, create('create-rollback-retried'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error?.message).not.toMatch(/rollback incomplete/);
    expect(names(t.calls).filter((m) => m === 'deleteImage')).toHaveLength(2);
    expect(t.storage.volumes(t.src.path, diskOf('create-rollback-retried'))).toEqual([]);
  });

  test('an image this creation did not make (the create refused IMAGE_EXISTS) is kept', async () => {
    const t = await setup({
      createVolume: () => {
        throw fail(Reason.IMAGE_EXISTS, 'image exists');
      },
    });
    const diskId = diskOf('create-refused');
    t.storage.add(t.src.path, diskId, { id: '66666666-6666-4666-8666-666666666666' });
    const op = await t.runToEnd(ops.createDisk, create('create-refused'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error).toMatchObject({ reason: Reason.IMAGE_EXISTS });
    expect(names(t.calls)).not.toContain('deleteImage');
    expect(t.storage.volumes(t.src.path, diskId).map((v) => v.id)).toEqual(['66666666-6666-4666-8666-666666666666']);
  });

  test('the rollback fences the operation in the domain before it looks for the disk (a late create then commits nothing)', async () => {
    const t = await withStorage((storage) => ({ createVolume: commitsThenFails(storage) }));
    const op = await t.runToEnd(ops.createDisk, create('create-fenced'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    const order = names(t.calls).filter((m) => ['createVolume', 'fenceOperation', 'listVolumes', 'deleteImage'].includes(m));
    expect(order.slice(order.indexOf('fenceOperation'))).toEqual(['fenceOperation', 'listVolumes', 'deleteImage']);
    const fence = t.calls.find((c) => c.method === 'fenceOperation')!;
    expect(fence.req).toEqual({ domainPath: t.src.path, operationId: operationIdFor('create-fenced') });
    expect(t.storage.volumes(t.src.path, diskOf('create-fenced'))).toEqual([]);
  });

  test('copy disk: the rollback fences the operation in the target domain before it deletes the target', async () => {
    const t = await setup({
      watchJob: () =>
        pb.Job.fromPartial({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { code: 13, reason: Reason.QEMU_IMG_FAILED, message: 'qemu-img: boom' } }),
    });
    const op = await t.runToEnd(
      ops.copyDisk,
      pb.CopyDiskRequest.fromPartial({ requestId: 'copy-fenced', storageDomainId: SRC, targetStorageDomainId: DST, diskId: DISK }),
    );
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    const fence = t.calls.find((c) => c.method === 'fenceOperation');
    expect(fence?.req).toEqual({ domainPath: t.dst.path, operationId: operationIdFor('copy-fenced') });
    const order = names(t.calls);
    expect(order.indexOf('fenceOperation')).toBeLessThan(order.lastIndexOf('deleteImage'));
  });

  test('snapshot disk: a snapshot that committed, then failed, is rolled back: the operation fenced, then its new leaf deleted', async () => {
    const t = await withStorage((storage) => ({ createVolume: commitsThenFails(storage) }));
    const op = await t.runToEnd(ops.snapshotDisk, pb.SnapshotDiskRequest.fromPartial({ requestId: 'snapshot-fails', storageDomainId: SRC, diskId: DISK }));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.error?.message).not.toMatch(/rollback incomplete/);
    expect(op.steps.map((s) => s.name)).toEqual(['inspect-disk', 'create-snapshot', 'rollback:delete-snapshot']);
    const order = names(t.calls).filter((m) => ['fenceOperation', 'listVolumes', 'deleteVolume'].includes(m));
    expect(order.slice(order.indexOf('fenceOperation'))).toEqual(['fenceOperation', 'listVolumes', 'deleteVolume']);
    expect(t.calls.find((c) => c.method === 'deleteVolume')!.req).toMatchObject({
      imageId: DISK,
      volumeId: derivedUuid(operationIdFor('snapshot-fails'), 'snapshot-volume'),
    });
    expect(t.storage.volumes(t.src.path, DISK).map((v) => v.id)).toEqual([BASE, TOP]);
  });

  test('snapshot disk: a snapshot refused before its create step deletes nothing and fences nothing', async () => {
    const t = await setup({ listVolumes: (_req, n) => (n === 2 ? { volumes: [] } : undefined) });
    const op = await t.runToEnd(ops.snapshotDisk, pb.SnapshotDiskRequest.fromPartial({ requestId: 'snapshot-no-leaf', storageDomainId: SRC, diskId: DISK }));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(names(t.calls)).not.toContain('fenceOperation');
    expect(names(t.calls)).not.toContain('deleteVolume');
  });

  test('a create that failed before it committed deletes nothing', async () => {
    const t = await setup({
      createVolume: () => {
        throw fail(Reason.QEMU_IMG_FAILED, 'qemu-img: boom before the commit');
      },
    });
    const op = await t.runToEnd(ops.createDisk, create('create-not-committed'));
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_FAILED);
    expect(op.steps.map((s) => s.name)).toEqual(['create-volume', 'rollback:delete-disk']);
    expect(names(t.calls)).not.toContain('deleteImage');
  });
});
