import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { pb } from '@sdmesh/common';
import { REPO_ROOT } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh, writeRandom, type PublicApi } from '../harness/scheduler-mesh';

const run = promisify(execFile);
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
/** Short, so the test sees both purge stages; production defaults are 7 and 30 days. */
const RETENTION_MS = 30_000;
const REQUEST_ID_RETENTION_MS = 38_000;

/**
 * The life of operations on a real mesh (nats-server, 2 sanlock hosts, every service a process,
 * two scheduler replicas on one KV): a throttled copy's progress moves through WatchOperation
 * (followed on the replica that does not run it) and its events; lists filtered by disk, domain
 * and type, paged; watch streams opened and cancelled leave no watcher behind; ended operations
 * are purged after the retention by exactly one replica, a retry of a purged request is refused
 * instead of run again, and after the request-id retention the tombstones go too (and their
 * KV delete markers: the bucket's stream ends empty).
 */
describe('operations: progress, filters, watchers, retention', () => {
  const m = new SchedulerMesh(2, {
    SDMESH_COPY_RATE_LIMIT: String(24 * MiB),
    SDMESH_OPERATION_RETENTION_MS: String(RETENTION_MS),
    SDMESH_REQUEST_ID_RETENTION_MS: String(REQUEST_ID_RETENTION_MS),
  });
  let a: pb.StorageDomain;
  let b: pb.StorageDomain;
  let disk: pb.Disk;
  let api2: PublicApi;
  const created: string[] = [];
  const copyRequest = () => ({ requestId: 'copy-progress', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });

  /** A metric's value on one replica (its lines carry the sdmesh_service/sdmesh_host labels too); labels: e.g. stage="record". */
  const metric = async (replica: number, name: string, label = ''): Promise<number> => {
    const text = await m.metrics(m.replicas[replica]!);
    const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && l.includes(label));
    return line ? Number(line.split(' ').at(-1)) : NaN;
  };
  const purged = async (stage: string) =>
    (await metric(0, 'sdmesh_scheduler_operations_purged_total', `stage="${stage}"`)) +
    (await metric(1, 'sdmesh_scheduler_operations_purged_total', `stage="${stage}"`));
  const until = async (what: string, pred: () => Promise<boolean>, ms = 60_000) => {
    const end = Date.now() + ms;
    while (!(await pred())) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 250));
    }
  };

  beforeAll(async () => {
    await m.start();
    api2 = m.publicApi((await m.startScheduler('scheduler-2')).grpcAddress);
    [a, b] = await Promise.all([m.createDomain('ops-a'), m.createDomain('ops-b')]);
    created.push('create-ops-a', 'create-ops-b');
  }, 120_000);
  afterAll(async () => {
    api2?.close();
    await m.stop();
  }, 60_000);

  test("a copy's progress moves while it runs: WatchOperation on the other replica and the events show values between 0 and 100", async () => {
    disk = await m.createDisk(a.id, 256 * MiB, 'disk-progress');
    created.push('disk-progress');
    writeRandom(disk.volumes[0]!.path, 0, 128);
    const op = await m.api.disks.copyDisk(copyRequest());
    created.push('copy-progress');
    const seen: pb.Operation[] = [];
    for await (const o of api2.ops.watchOperation({ name: op.name }, { timeoutMs: 120_000 })) seen.push(o);
    const final = seen.at(-1)!;
    expect(final.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const between = seen.map((o) => o.progress?.percent ?? 0).filter((p) => p > 0 && p < 100);
    expect(between.length).toBeGreaterThanOrEqual(1);
    // The same bytes on the step, with the copy's rate.
    const stepProgress = seen.flatMap((o) => o.steps.filter((s) => s.name.startsWith('copy-volume') && s.progress).map((s) => s.progress!));
    expect(stepProgress.some((p) => p.bytesDone > 0 && p.bytesDone < 256 * MiB && p.mbps > 0)).toBe(true);
    expect(seen.some((o) => o.progress!.mbps > 0)).toBe(true);
    expect(final.progress).toMatchObject({ percent: 100, bytesTotal: 256 * MiB });

    // The events carry it too, at most about one a second while the copy runs.
    const copyEvents = m.operationEvents(op.name).filter((e) => e.step.startsWith('copy-volume'));
    expect(copyEvents.some((e) => e.progress!.percent > 0 && e.progress!.percent < 100)).toBe(true);
    const copyStep = final.steps.find((s) => s.name.startsWith('copy-volume'))!;
    const copySeconds = (copyStep.endTime!.getTime() - copyStep.startTime!.getTime()) / 1000;
    // Progress changes reach the events at most once a second (plus the step's start and end).
    const changes = copyEvents.filter((e, i) => i > 0 && e.progress!.percent !== copyEvents[i - 1]!.progress!.percent);
    expect(changes.length).toBeLessThanOrEqual(Math.ceil(copySeconds) + 2);
  }, 120_000);

  test('lists filter by disk, domain and type, page by position, refuse bad filters; sdmctl ops list --disk --type --domain', async () => {
    const [d2, d3] = await Promise.all([m.createDisk(b.id, 16 * MiB, 'disk-b-1'), m.createDisk(b.id, 16 * MiB, 'disk-b-2')]);
    created.push('disk-b-1', 'disk-b-2');
    const ids = async (filter: string, api = m.api) =>
      (await api.ops.listOperations({ filter, pageSize: 0, pageToken: '' })).operations.map((o) => o.requestId);
    expect(await ids(`disk=${disk.id}`)).toEqual(['disk-progress', 'copy-progress']);
    expect(await ids(`disk=${d2.id}`, api2)).toEqual(['disk-b-1']);
    expect(await ids(`domain=${b.id} AND type=CREATE_DISK`)).toEqual(expect.arrayContaining(['disk-b-1', 'disk-b-2']));
    expect(await ids(`domain=${b.id} AND type=CREATE_DISK`)).toHaveLength(2);
    // The copy names both domains (source disk in a, new disk in b).
    expect(await ids(`domain=${a.id} AND type=COPY_DISK`)).toEqual(['copy-progress']);
    expect(await ids(`domain=${b.id} AND type=COPY_DISK AND status=DONE`)).toEqual(['copy-progress']);
    expect(await ids(`disk=${d3.id} AND type=COPY_DISK`)).toEqual([]);

    // Pages of 2 add up to the whole list, each operation once.
    const all = await ids('');
    const paged: string[] = [];
    let pageToken = '';
    do {
      const page = await api2.ops.listOperations({ filter: '', pageSize: 2, pageToken });
      expect(page.operations.length).toBeLessThanOrEqual(2);
      paged.push(...page.operations.map((o) => o.requestId));
      pageToken = page.nextPageToken;
    } while (pageToken);
    expect(paged).toEqual(all);

    expect(await codeOf(m.api.ops.listOperations({ filter: 'disk=nope', pageSize: 0, pageToken: '' }))).toEqual(['INVALID_ARGUMENT', 'INVALID_FILTER']);
    expect(await codeOf(m.api.ops.listOperations({ filter: 'owner=x', pageSize: 0, pageToken: '' }))).toEqual(['INVALID_ARGUMENT', 'INVALID_FILTER']);
    expect(await codeOf(m.api.ops.listOperations({ filter: '', pageSize: -5, pageToken: '' }))).toEqual(['INVALID_ARGUMENT', 'INVALID_PAGE_SIZE']);
    expect(await codeOf(m.api.ops.listOperations({ filter: '', pageSize: 1, pageToken: 'garbage' }))).toEqual(['INVALID_ARGUMENT', 'INVALID_PAGE_TOKEN']);

    const env = {
      PATH: process.env.PATH,
      SDMESH_ADDRESS: m.replicas[1]!.grpcAddress,
      ...m.mesh.nats.clientEnv('sdmctl'),
      ...m.mesh.tlsEnv({ kind: 'user', name: 'viewer' }),
      SDMCTL_OUTPUT: '',
    };
    const sdmctl = async (...args: string[]) =>
      JSON.parse((await run(process.execPath, [SDMCTL, ...args, '-o', 'json'], { env, timeout: 60_000 })).stdout) as Array<{ requestId: string }>;
    expect((await sdmctl('ops', 'list', '--disk', disk.id, '--type', 'copy_disk')).map((o) => o.requestId)).toEqual(['copy-progress']);
    expect((await sdmctl('ops', 'list', '--domain', 'ops-b', '--type', 'create_disk')).map((o) => o.requestId).sort()).toEqual(['disk-b-1', 'disk-b-2']);
  }, 90_000);

  test('watch streams opened and cancelled leave no watcher behind (gauge back to 0)', async () => {
    const op = await m.api.disks.copyDisk({ ...copyRequest(), requestId: 'copy-watched' });
    created.push('copy-watched');
    const controllers = Array.from({ length: 40 }, () => new AbortController());
    const firsts = controllers.map(async (c, i) => {
      const it = (i % 2 ? api2 : m.api).ops.watchOperation({ name: op.name }, { signal: c.signal })[Symbol.asyncIterator]();
      await it.next();
    });
    await Promise.all(firsts);
    await until(
      '40 watchers',
      async () => (await metric(0, 'sdmesh_scheduler_operation_watchers')) + (await metric(1, 'sdmesh_scheduler_operation_watchers')) === 40,
      15_000,
    );
    // Cancelled while the copy still runs: the streams did not end by themselves.
    expect((await m.api.ops.getOperation({ name: op.name })).status).toBe(pb.OperationStatus.OPERATION_STATUS_RUNNING);
    for (const c of controllers) c.abort();
    await until(
      'watchers gone',
      async () => (await metric(0, 'sdmesh_scheduler_operation_watchers')) + (await metric(1, 'sdmesh_scheduler_operation_watchers')) === 0,
    );
    expect((await m.wait(op.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
  }, 90_000);

  test('ended operations are purged after the retention by one replica; a retried request is refused, not run again; then the request id is free', async () => {
    const request = { requestId: 'disk-retained', storageDomainId: a.id, capacityBytes: 16 * MiB };
    const { name } = await m.done(m.api.disks.createDisk(request));
    created.push('disk-retained');
    // Within the retention: a retry is answered with the operation.
    expect((await api2.disks.createDisk(request)).name).toBe(name);
    await until('the operation purged', async () => (await codeOf(api2.ops.getOperation({ name })))[1] === 'OPERATION_PURGED', RETENTION_MS + 20_000);
    await expect(m.api.ops.getOperation({ name })).rejects.toThrow(/CREATE_DISK.*ended DONE at .*was purged/);
    const disksBefore = (await m.api.disks.listDisks({ storageDomainId: a.id, pageSize: 0, pageToken: '' })).disks.length;
    expect(await codeOf(m.api.disks.createDisk(request))).toEqual(['FAILED_PRECONDITION', 'REQUEST_ID_EXPIRED']);
    expect(await codeOf(m.api.disks.createDisk({ ...request, capacityBytes: 32 * MiB }))).toEqual(['ALREADY_EXISTS', 'REQUEST_ID_REUSED']);
    expect(await codeOf(api2.ops.waitOperation({ name, timeoutSeconds: 1 }))).toEqual(['NOT_FOUND', 'OPERATION_PURGED']);
    expect(await codeOf(m.api.ops.cancelOperation({ name }))).toEqual(['NOT_FOUND', 'OPERATION_PURGED']);
    // Nothing ran again.
    expect((await m.api.disks.listDisks({ storageDomainId: a.id, pageSize: 0, pageToken: '' })).disks).toHaveLength(disksBefore);
    // ListDisks pages in disk id order, read from metadata-tx a page at a time: pages of one disk give the same disks as one page.
    const allDisks = (await m.api.disks.listDisks({ storageDomainId: a.id, pageSize: 0, pageToken: '' })).disks.map((d) => d.id);
    const pagedDisks: string[] = [];
    let diskToken = '';
    do {
      const page = await api2.disks.listDisks({ storageDomainId: a.id, pageSize: 1, pageToken: diskToken });
      pagedDisks.push(...page.disks.map((d) => d.id));
      diskToken = page.nextPageToken;
    } while (diskToken);
    expect(allDisks.length).toBeGreaterThan(1);
    expect(pagedDisks).toEqual(allDisks);
    expect(await codeOf(m.api.disks.listDisks({ storageDomainId: a.id, pageSize: 0, pageToken: 'garbage' }))).toEqual([
      'INVALID_ARGUMENT',
      'INVALID_PAGE_TOKEN',
    ]);

    // Every operation of this test goes, each purged by exactly one of the two replicas.
    await until('all purged', async () => (await m.api.ops.listOperations({ filter: '', pageSize: 0, pageToken: '' })).operations.length === 0, 30_000);
    await until('counters', async () => (await purged('record')) === created.length, 10_000);
    // Then the tombstones: the request id is free again.
    await until('tombstone gone', async () => (await codeOf(api2.ops.getOperation({ name })))[1] === 'OPERATION_NOT_FOUND', REQUEST_ID_RETENTION_MS);
    await until('request-id counters', async () => (await purged('request_id')) === created.length, 20_000);
    // Nothing is left in the bucket's stream: no records, no delete markers (read as a reader).
    const nc = await connect(m.mesh.nats.connectOptions('sdmctl'));
    try {
      const jsm = await jetstreamManager(nc);
      await until('markers compacted', async () => (await jsm.streams.info('KV_sdmesh_operations')).state.messages === 0, 10_000);
    } finally {
      await nc.close();
    }
  }, 150_000);
});
