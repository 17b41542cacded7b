import { EventEmitter } from 'node:events';
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Registry } from 'prom-client';
import {
  createLogger,
  encodeDomainMetadata,
  encodeVolumeRecord,
  GrpcStatus,
  newVolumeRecord,
  pb,
  Reason,
  SdmeshError,
  type VolumeRecord,
} from '@sdmesh/common';
import { JobManager, type WorkerHandle } from '../../services/data-mover/src/jobs';
import { ThroughputWindow } from '../../services/data-mover/src/metrics';
import { convertArgs, ProgressParser, ProgressThrottle } from '../../services/data-mover/src/qemu';
import { hashImage, openImageFiles } from '../../services/data-mover/src/checksum';
import type { ParentToWorker, WorkerToParent } from '../../services/data-mover/src/worker-protocol';

/** A worker that does what the test tells it to. */
class FakeWorker extends EventEmitter implements WorkerHandle {
  static nextPid = 1000;
  readonly pid = FakeWorker.nextPid++;
  readonly received: ParentToWorker[] = [];
  /** SIGSTOP / SIGCONT received, in order (a stopped worker does not exit). */
  readonly jobControl: NodeJS.Signals[] = [];
  send(msg: ParentToWorker): void {
    this.received.push(msg);
  }
  kill(signal: NodeJS.Signals): void {
    if (signal === 'SIGSTOP' || signal === 'SIGCONT') return void this.jobControl.push(signal);
    setImmediate(() => this.emit('exit', null, signal));
  }
  /** Stopped by the job manager and not continued since. */
  get stopped(): boolean {
    return this.jobControl.at(-1) === 'SIGSTOP';
  }
  report(msg: WorkerToParent): void {
    this.emit('message', msg);
  }
  exit(code = 0): void {
    this.emit('exit', code, null);
  }
}

const tick = () => new Promise((r) => setImmediate(r));

describe('data-mover job manager (fake workers, real domain files)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-dm-unit-'));
  const domainId = randomUUID();
  const domainPath = path.join(root, 'dom');
  const imageId = randomUUID();
  const vol = (legality: VolumeRecord['legality'], capacityBytes = 1 << 20, generation = 0): pb.VolumeRef => {
    const volumeId = randomUUID();
    const rec = newVolumeRecord({ volumeId, imageId, domainId, capacityBytes, legality, generation, ctimeMs: 1, leaseSlot: 3 });
    fs.writeFileSync(path.join(domainPath, 'images', imageId, `${volumeId}.meta`), encodeVolumeRecord(rec));
    fs.writeFileSync(path.join(domainPath, 'images', imageId, volumeId), '');
    return { domainPath, imageId, volumeId };
  };
  let workers: FakeWorker[];
  let jobs: JobManager;
  const make = (max = 1, warmWorkers = 0) => {
    workers = [];
    jobs = new JobManager({
      hostName: 'h1',
      maxConcurrentJobs: max,
      workerConfig: {
        leaseManagerAddress: 'unix:/nonexistent/lease-manager.sock',
        hostId: 1,
        hostName: 'h1',
        logLevel: 'silent',
        sourceLeaseWaitMs: 1000,
        importDirs: [],
      },
      registry: new Registry(),
      log: createLogger('test', 'silent'),
      launchWorker: () => {
        const w = new FakeWorker();
        workers.push(w);
        return w;
      },
      abortGraceMs: 50,
      warmWorkers,
    });
    return jobs;
  };

  beforeAll(() => {
    fs.mkdirSync(path.join(domainPath, 'dom_md'), { recursive: true });
    fs.mkdirSync(path.join(domainPath, 'images', imageId), { recursive: true });
    fs.writeFileSync(
      path.join(domainPath, 'dom_md', 'metadata'),
      encodeDomainMetadata({ domainId, name: 'd', ctimeMs: 1, maxVolumes: 100, ioTimeoutSeconds: 1, leaseSlotSize: 1 << 20, firstVolumeSlot: 3 }),
    );
  });
  afterEach(() => jobs?.stop(100));
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

  it('queues FIFO beyond the limit, reports load, and finishes jobs from worker results', async () => {
    make(1);
    const src = vol('LEGAL');
    const [d1, d2] = [vol('ILLEGAL'), vol('ILLEGAL')];
    const j1 = await jobs.copy({
      jobId: 'j1',
      source: src,
      destination: d1,
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    });
    const j2 = await jobs.copy({
      jobId: 'j2',
      source: src,
      destination: d2,
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    });
    expect([j1.status, j2.status]).toEqual([pb.JobStatus.JOB_STATUS_RUNNING, pb.JobStatus.JOB_STATUS_QUEUED]);
    expect(jobs.load()).toMatchObject({ runningJobs: 1, queuedJobs: 1, maxConcurrentJobs: 1 });
    expect(workers).toHaveLength(1);
    expect(workers[0]!.received[0]).toMatchObject({ type: 'prepare', config: { leaseManagerAddress: 'unix:/nonexistent/lease-manager.sock' } });
    expect(workers[0]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'j1', destinationGeneration: 0 } });

    workers[0]!.report({ type: 'phase', phase: 'copying' });
    workers[0]!.report({ type: 'progress', percent: 50, dataBytes: 1000, totalBytes: 1 << 20 });
    expect(jobs.get('j1').progress).toMatchObject({ percent: 50, bytesDone: 1 << 19, bytesTotal: 1 << 20 });
    workers[0]!.report({ type: 'done', generation: 1, verified: false });
    workers[0]!.exit();
    await tick();
    expect(jobs.get('j1')).toMatchObject({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 1, phase: '' });
    // The next one starts when a slot frees.
    expect(workers).toHaveLength(2);
    expect(jobs.get('j2').status).toBe(pb.JobStatus.JOB_STATUS_RUNNING);
    workers[1]!.report({ type: 'failed', error: { code: GrpcStatus.FAILED_PRECONDITION, message: 'gen', reason: 'GENERATION_MISMATCH' } });
    workers[1]!.exit();
    await tick();
    expect(jobs.get('j2')).toMatchObject({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { reason: 'GENERATION_MISMATCH' } });
    expect(jobs.load()).toMatchObject({ runningJobs: 0, queuedJobs: 0 });
  });

  it('is idempotent on job id, refuses a reused id with another request, and refuses a second writer of one destination', async () => {
    make(2);
    const src = vol('LEGAL');
    const dst = vol('ILLEGAL');
    const req = {
      jobId: 'same',
      source: src,
      destination: dst,
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    };
    await jobs.copy(req);
    expect((await jobs.copy(req)).id).toBe('same');
    expect(workers).toHaveLength(1);
    await expect(jobs.copy({ ...req, verify: true })).rejects.toMatchObject({ code: GrpcStatus.ALREADY_EXISTS, reason: 'JOB_ID_CONFLICT' });
    await expect(jobs.copy({ ...req, jobId: 'other' })).rejects.toMatchObject({ code: GrpcStatus.ABORTED, reason: 'DESTINATION_BUSY' });
  });

  it('aborts a queued job at once and a running one through its worker (SIGKILL if it does not stop)', async () => {
    make(1);
    const src = vol('LEGAL');
    const base = { source: src, destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
    await jobs.copy({ ...base, jobId: 'run', destination: vol('ILLEGAL') });
    await jobs.copy({ ...base, jobId: 'wait', destination: vol('ILLEGAL') });
    const queued = await jobs.abort('wait', 'test');
    expect(queued).toMatchObject({ status: pb.JobStatus.JOB_STATUS_ABORTED, error: { reason: 'ABORTED' } });
    workers[0]!.report({ type: 'marked-illegal' });
    // The fake ignores the abort message: the grace timer SIGKILLs it.
    const running = await jobs.abort('run', 'test');
    expect(workers[0]!.received.map((m) => m.type)).toEqual(['prepare', 'start', 'abort']);
    expect(running).toMatchObject({ status: pb.JobStatus.JOB_STATUS_ABORTED, destinationMarkedIllegal: true });
    expect(running.error!.message).toMatch(/stays ILLEGAL/);
  });

  it('a worker that dies without a result fails the job with WORKER_DIED', async () => {
    make(1);
    await jobs.copy({
      jobId: 'dies',
      source: vol('LEGAL'),
      destination: vol('ILLEGAL'),
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    });
    workers[0]!.emit('exit', null, 'SIGKILL');
    // The lease-manager address is unreachable, so no lockspace is known lost. Asking it may take
    // its whole 2 s deadline, later on a busy machine: the job's end is waited for, not a fixed time.
    for (const end = Date.now() + 20_000; jobs.get('dies').status !== pb.JobStatus.JOB_STATUS_FAILED && Date.now() < end;) {
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(jobs.get('dies')).toMatchObject({ status: pb.JobStatus.JOB_STATUS_FAILED, error: { reason: 'WORKER_DIED' } });
  });

  it('watch yields states until the end, including changes made while the consumer was busy', async () => {
    make(1);
    await jobs.copy({
      jobId: 'w',
      source: vol('LEGAL'),
      destination: vol('ILLEGAL'),
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    });
    const seen: string[] = [];
    const ctl = new AbortController();
    const consumer = (async () => {
      for await (const j of jobs.watch('w', ctl.signal)) {
        seen.push(pb.JobStatus[j.status]);
        if (seen.length === 1) {
          workers[0]!.report({ type: 'done', generation: 1, verified: false });
          workers[0]!.exit();
          await tick();
        }
      }
    })();
    await consumer;
    expect(seen[0]).toBe('JOB_STATUS_RUNNING');
    expect(seen.at(-1)).toBe('JOB_STATUS_DONE');
  });

  it('checks requests before queuing: nothing is written and no job exists', async () => {
    make(1);
    const src = vol('LEGAL', 2 << 20);
    const dst = vol('ILLEGAL', 1 << 20);
    const before = fs.readFileSync(path.join(domainPath, 'images', imageId, `${dst.volumeId}.meta`));
    const base = {
      jobId: 'bad',
      source: src,
      destination: dst,
      destinationGeneration: 0,
      collapse: true,
      verify: false,
      rateLimitBytesPerSecond: 0,
      sourceFile: '',
      merge: false,
    };
    await expect(jobs.copy(base)).rejects.toMatchObject({ code: GrpcStatus.FAILED_PRECONDITION, reason: 'DESTINATION_TOO_SMALL' });
    await expect(jobs.copy({ ...base, destination: src })).rejects.toMatchObject({ code: GrpcStatus.INVALID_ARGUMENT, reason: 'SAME_VOLUME' });
    await expect(jobs.copy({ ...base, source: vol('ILLEGAL') })).rejects.toMatchObject({ reason: 'SOURCE_ILLEGAL' });
    await expect(jobs.copy({ ...base, jobId: '' })).rejects.toMatchObject({ reason: 'INVALID_JOB_ID' });
    await expect(jobs.copy({ ...base, destinationGeneration: -1 })).rejects.toMatchObject({ reason: 'INVALID_GENERATION' });
    await expect(jobs.copy({ ...base, source: { ...src, volumeId: randomUUID() } })).rejects.toMatchObject({
      code: GrpcStatus.NOT_FOUND,
      reason: 'VOLUME_NOT_FOUND',
    });
    expect(fs.readFileSync(path.join(domainPath, 'images', imageId, `${dst.volumeId}.meta`))).toEqual(before);
    expect(jobs.list()).toEqual([]);
    expect(workers).toHaveLength(0);
  });

  it('keeps one warm idle worker: a job takes it, another is pre-started, jobs still count against the limit, stop kills it', async () => {
    make(1, 1);
    // Pre-started before any job; told only to prepare (register with sanlock, no lease).
    expect(workers).toHaveLength(1);
    expect(workers[0]!.received.map((m) => m.type)).toEqual(['prepare']);
    const src = vol('LEGAL');
    const base = { source: src, destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
    await jobs.copy({ ...base, jobId: 'warm1', destination: vol('ILLEGAL') });
    // The job took the warm worker; a new idle one waits for the next job.
    expect(workers[0]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'warm1' } });
    expect(workers).toHaveLength(2);
    expect(workers[1]!.received.map((m) => m.type)).toEqual(['prepare']);
    // The concurrency limit counts jobs, not idle workers: the second job queues.
    expect((await jobs.copy({ ...base, jobId: 'warm2', destination: vol('ILLEGAL') })).status).toBe(pb.JobStatus.JOB_STATUS_QUEUED);
    // Messages and exit of the idle worker do not touch any job.
    workers[1]!.report({ type: 'done', generation: 7, verified: false });
    workers[0]!.report({ type: 'done', generation: 1, verified: false });
    workers[0]!.exit();
    await tick();
    expect(jobs.get('warm1')).toMatchObject({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 1 });
    // warm2 took the idle worker (each worker runs one job), and another is pre-started.
    expect(workers[1]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'warm2' } });
    expect(workers).toHaveLength(3);
    // An aborted job's worker is killed; the idle one is not touched.
    await jobs.abort('warm2', 'test');
    expect(jobs.get('warm2').status).toBe(pb.JobStatus.JOB_STATUS_ABORTED);
    expect(workers[2]!.received.map((m) => m.type)).toEqual(['prepare']);
    // stop() kills the idle worker and waits for its exit.
    const exits: Array<NodeJS.Signals | null> = [];
    workers[2]!.on('exit', (_code: number | null, signal: NodeJS.Signals | null) => exits.push(signal));
    await jobs.stop(1000);
    expect(exits).toEqual(['SIGKILL']);
    expect(workers).toHaveLength(3);
  });

  it('keeps two warm workers: a job takes the older one; a job is DONE at its report, its slot frees at the exit', async () => {
    make(1, 2);
    expect(workers).toHaveLength(2);
    const src = vol('LEGAL');
    const base = { source: src, destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
    await jobs.copy({ ...base, jobId: 'pool1', destination: vol('ILLEGAL') });
    expect(workers[0]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'pool1' } });
    expect(workers[1]!.received.map((m) => m.type)).toEqual(['prepare']);
    // The other warm worker waits for the next job: the replacement starts once pool1 holds its leases.
    expect(workers).toHaveLength(2);
    workers[0]!.report({ type: 'phase', phase: 'acquiring-leases' });
    expect(workers).toHaveLength(2);
    workers[0]!.report({ type: 'marked-illegal' });
    expect(workers).toHaveLength(3);
    expect(workers[2]!.received.map((m) => m.type)).toEqual(['prepare']);
    expect((await jobs.copy({ ...base, jobId: 'pool2', destination: vol('ILLEGAL') })).status).toBe(pb.JobStatus.JOB_STATUS_QUEUED);
    workers[0]!.report({ type: 'done', generation: 1, verified: false });
    expect(jobs.get('pool1')).toMatchObject({ status: pb.JobStatus.JOB_STATUS_DONE, resultGeneration: 1 });
    // Its process still counts until it exits: pool2 waits for the slot.
    expect(jobs.get('pool2').status).toBe(pb.JobStatus.JOB_STATUS_QUEUED);
    workers[0]!.exit();
    await tick();
    expect(jobs.get('pool1').status).toBe(pb.JobStatus.JOB_STATUS_DONE);
    expect(workers[1]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'pool2' } });
  });

  it('stops warm workers still starting while a job takes its worker and leases or commits, and continues them after', async () => {
    make(2, 2);
    expect(workers).toHaveLength(2);
    // worker 0 is done starting; worker 1 is still loading.
    workers[0]!.report({ type: 'ready' });
    const base = { source: vol('LEGAL'), destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
    await jobs.copy({ ...base, jobId: 'fixed1', destination: vol('ILLEGAL') });
    // The job took the ready worker (never stopped); the starting one waits while the job takes its leases.
    expect(workers[0]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'fixed1' } });
    expect(workers[0]!.jobControl).toEqual([]);
    expect(workers[1]!.stopped).toBe(true);
    workers[0]!.report({ type: 'phase', phase: 'acquiring-leases' });
    expect(workers[1]!.stopped).toBe(true);
    // Leases held, destination ILLEGAL: the data moves, the starting worker and the replacement load
    // meanwhile (continued after this turn of the event loop).
    workers[0]!.report({ type: 'marked-illegal' });
    expect(workers[1]!.stopped).toBe(true);
    await tick();
    expect(workers[1]!.jobControl).toEqual(['SIGSTOP', 'SIGCONT']);
    expect(workers).toHaveLength(3);
    expect(workers[2]!.jobControl).toEqual([]);
    workers[0]!.report({ type: 'phase', phase: 'copying' });
    expect(workers[2]!.stopped).toBe(false);
    // The commit is every job's fixed cost again: stopped until the job ends.
    workers[0]!.report({ type: 'phase', phase: 'committing' });
    expect([workers[1]!.stopped, workers[2]!.stopped]).toEqual([true, true]);
    workers[0]!.report({ type: 'done', generation: 1, verified: false });
    expect(jobs.get('fixed1').status).toBe(pb.JobStatus.JOB_STATUS_DONE);
    await tick();
    expect([workers[1]!.stopped, workers[2]!.stopped]).toEqual([false, false]);
    // worker 1 is done starting now, worker 2 is not.
    workers[1]!.report({ type: 'ready' });
    const signalsBefore = workers[1]!.jobControl.length;
    await jobs.copy({ ...base, jobId: 'fixed2', destination: vol('ILLEGAL') });
    // The next job takes the oldest ready worker; the one still starting is stopped, a ready one never.
    expect(workers[1]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'fixed2' } });
    expect(workers[1]!.jobControl.length).toBe(signalsBefore);
    expect(workers[2]!.stopped).toBe(true);
    // A job taking a stopped worker (none ready) continues it first.
    workers[0]!.exit();
    await tick();
    await jobs.copy({ ...base, jobId: 'fixed3', destination: vol('ILLEGAL') });
    expect(workers[2]!.received[1]).toMatchObject({ type: 'start', job: { jobId: 'fixed3' } });
    expect(workers[2]!.stopped).toBe(false);
    await jobs.stop(1000);
  });

  it('stops starting workers for a bounded time only: a job waiting long for its leases does not keep them stopped', async () => {
    jest.useFakeTimers({ doNotFake: ['setImmediate', 'nextTick'] });
    try {
      make(1, 1);
      const base = { source: vol('LEGAL'), destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
      await jobs.copy({ ...base, jobId: 'slow1', destination: vol('ILLEGAL') });
      // The replacement was started with the job (no other warm worker left) and waits.
      expect(workers).toHaveLength(2);
      expect(workers[1]!.stopped).toBe(true);
      jest.advanceTimersByTime(1000);
      expect(workers[1]!.jobControl).toEqual(['SIGSTOP', 'SIGCONT']);
      // Not stopped again while that job is still in its fixed phase.
      workers[0]!.report({ type: 'phase', phase: 'acquiring-leases' });
      expect(workers[1]!.stopped).toBe(false);
      workers[0]!.report({ type: 'failed', error: { code: GrpcStatus.ABORTED, message: 'lease wait', reason: Reason.LEASE_WAIT_TIMEOUT } });
      workers[0]!.exit();
      await tick();
      expect(jobs.get('slow1').status).toBe(pb.JobStatus.JOB_STATUS_FAILED);
    } finally {
      jest.useRealTimers();
    }
  });

  it('replaces the worker of a job that ended before it held its leases at its end', async () => {
    make(1, 2);
    const base = { source: vol('LEGAL'), destinationGeneration: 0, collapse: true, verify: false, rateLimitBytesPerSecond: 0, sourceFile: '', merge: false };
    await jobs.copy({ ...base, jobId: 'early1', destination: vol('ILLEGAL') });
    expect(workers).toHaveLength(2);
    workers[0]!.report({ type: 'failed', error: { code: GrpcStatus.ABORTED, message: 'lease busy', reason: Reason.LEASE_HELD } });
    workers[0]!.exit();
    await tick();
    expect(jobs.get('early1').status).toBe(pb.JobStatus.JOB_STATUS_FAILED);
    expect(workers).toHaveLength(3);
    expect(workers[2]!.received.map((m) => m.type)).toEqual(['prepare']);
    await jobs.stop(1000);
  });

  it('replaces an idle worker that died, after a pause', async () => {
    jest.useFakeTimers({ doNotFake: ['setImmediate', 'nextTick'] });
    try {
      make(1, 1);
      workers[0]!.exit(1);
      expect(workers).toHaveLength(1);
      jest.advanceTimersByTime(5000);
      expect(workers).toHaveLength(2);
      // Idle again: prepared, no job.
      expect(workers[1]!.received.map((m) => m.type)).toEqual(['prepare']);
    } finally {
      jest.useRealTimers();
    }
  });

  it('refuses copies without a lease-manager', async () => {
    const j = new JobManager({
      hostName: 'h1',
      maxConcurrentJobs: 1,
      workerConfig: { leaseManagerAddress: '', hostId: 1, hostName: 'h1', logLevel: 'silent', sourceLeaseWaitMs: 1000, importDirs: [] },
      registry: new Registry(),
      log: createLogger('test', 'silent'),
    });
    const err = await j
      .copy({
        jobId: 'x',
        source: vol('LEGAL'),
        destination: vol('ILLEGAL'),
        destinationGeneration: 0,
        collapse: true,
        verify: false,
        rateLimitBytesPerSecond: 0,
        sourceFile: '',
        merge: false,
      })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SdmeshError);
    expect((err as SdmeshError).reason).toBe('NO_LEASE_MANAGER');
    await j.stop(10);
  });
});

describe('data-mover helpers', () => {
  it('parses qemu-img -p progress, also split across chunks', () => {
    const p = new ProgressParser();
    expect(p.feed('    (0.00/100%)\r    (12.')).toBe(0);
    expect(p.feed('50/100%)\r')).toBe(12.5);
    expect(p.feed('no progress here')).toBeUndefined();
    expect(p.feed('    (100.00/100%)\r')).toBe(100);
  });

  it('spaces progress reports: one per interval, the last one held back reported by the next that passes or by flush', () => {
    let now = 0;
    const t = new ProgressThrottle(100, () => now);
    expect(t.offer(1)).toBe(1);
    now = 40;
    expect(t.offer(2)).toBeUndefined();
    now = 99;
    expect(t.offer(3)).toBeUndefined();
    now = 100;
    expect(t.offer(4)).toBe(4);
    now = 150;
    expect(t.offer(5)).toBeUndefined();
    expect(t.flush()).toBe(5);
    expect(t.flush()).toBeUndefined();
    // flush counts as a report: the next one waits its interval.
    now = 200;
    expect(t.offer(6)).toBeUndefined();
    now = 250;
    expect(t.offer(7)).toBe(7);
    // Held without a report (the worker does not know the data figure yet): out at the flush.
    t.hold(8);
    expect(t.flush()).toBe(8);
  });

  it('builds convert arguments for each kind of copy', () => {
    const base = { source: '/s', sourceFormat: 'RAW' as const, destination: '/d', preallocated: false, rateLimitBytesPerSecond: 0 };
    // -t none: the destination is written O_DIRECT (docs/data-mover.md, "No write outlives its lease").
    const head = ['convert', '-p', '-U', '-n', '-t', 'none'];
    expect(convertArgs({ ...base, destinationFormat: 'RAW' })).toEqual([...head, '-f', 'raw', '-O', 'raw', '-m', '16', '-W', '/s', '/d']);
    expect(
      convertArgs({
        ...base,
        sourceFormat: 'QCOW2',
        destinationFormat: 'QCOW2',
        backing: { file: 'p', format: 'RAW' },
        rateLimitBytesPerSecond: 1000,
        preallocated: true,
      }),
    ).toEqual([...head, '-f', 'qcow2', '-O', 'qcow2', '-m', '16', '-S', '0', '-B', 'p', '-F', 'raw', '-r', '1000', '/s', '/d']);
  });

  it('computes recent throughput over a sliding window', () => {
    let now = 0;
    const w = new ThroughputWindow(60_000, () => now);
    expect(w.mbps()).toBe(0);
    w.add(10e6);
    now = 9000;
    w.add(90e6);
    expect(w.mbps()).toBeCloseTo(10, 5); // 100 MB over 10 s
    now = 200_000;
    expect(w.mbps()).toBe(0);
  });

  it('hashes guest-visible content: raw, qcow2 and a qcow2 chain of the same data hash alike', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-dm-hash-'));
    try {
      const raw = path.join(dir, 'raw');
      execFileSync('truncate', ['-s', '8M', raw]);
      execFileSync('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=64K', 'count=16', 'seek=20', 'conv=notrunc', 'status=none']);
      // A compressible run too, so `convert -c` really writes compressed clusters.
      execFileSync('sh', ['-c', `yes sdmesh | head -c 1048576 | dd of=${raw} bs=64K seek=60 conv=notrunc status=none`]);
      const expected = execFileSync('sha256sum', [raw], { encoding: 'utf8' }).split(' ')[0];
      execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, path.join(dir, 'q')]);
      execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, path.join(dir, 'compressed')]);
      // A chain: an empty base and a top holding the data.
      execFileSync('qemu-img', ['create', '-q', '-f', 'raw', path.join(dir, 'base'), '8M']);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base', '-F', 'raw', path.join(dir, 'top')]);
      execFileSync('qemu-img', ['convert', '-n', '-B', 'base', '-F', 'raw', '-f', 'raw', '-O', 'qcow2', raw, path.join(dir, 'top')], { cwd: dir });
      const layers: Array<Array<{ file: string; format: 'RAW' | 'QCOW2' }>> = [
        [{ file: raw, format: 'RAW' }],
        [{ file: path.join(dir, 'q'), format: 'QCOW2' }],
        [
          { file: path.join(dir, 'top'), format: 'QCOW2' },
          { file: path.join(dir, 'base'), format: 'RAW' },
        ],
        [{ file: path.join(dir, 'compressed'), format: 'QCOW2' }],
      ];
      const sums = await Promise.all(
        layers.map(async (l) => {
          const chain = await openImageFiles(l);
          try {
            return await hashImage(chain);
          } finally {
            await chain.close();
          }
        }),
      );
      expect(sums.map((s) => s.checksum)).toEqual([expected, expected, expected, expected]);
      expect(sums.map((s) => s.method)).toEqual(['map', 'map', 'map', 'raw-copy']);
      expect(sums[0]!.bytes).toBe(8 * 1024 * 1024);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
