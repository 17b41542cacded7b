import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  aborted,
  alreadyExists,
  localLeaseManagerClient,
  failedPrecondition,
  GrpcStatus,
  invalidArgument,
  notFound,
  pb,
  type EventPublisher,
  type Logger,
  fail,
  Reason,
} from '@sdmesh/common';
import type { Registry } from 'prom-client';
import { checkMerge } from './merge';
import { DataMoverMetrics, ThroughputWindow } from './metrics';
import { inspectSourceFile } from './source-file';
import { checkVolumeJob, volumeOpOf } from './volume-job';
import { checkCopy, checkImport, resolveVolume, type ResolvedVolume } from './volumes';
import type { CopyJobSpec, JobPhase, LeaseSlot, ParentToWorker, WireError, WorkerConfig, WorkerToParent } from './worker-protocol';

/** A running copy worker, as the job manager sees it (a child process, or a fake in unit tests). */
export interface WorkerHandle {
  readonly pid: number | undefined;
  send(msg: ParentToWorker): void;
  kill(signal: NodeJS.Signals): void;
  on(event: 'message', fn: (msg: WorkerToParent) => void): this;
  on(event: 'exit', fn: (code: number | null, signal: NodeJS.Signals | null) => void): this;
}
export type WorkerLauncher = () => WorkerHandle;

export const WORKER_SCRIPT = path.join(__dirname, 'copy-worker.js');

/**
 * Starts copy-worker.js through `setpriv --pdeathsig KILL`: if this service dies (even by
 * SIGKILL) the kernel kills the worker, whose qemu-img dies with it, and sanlock frees the
 * worker's leases. Its logs go to our stdout/stderr; messages go over the IPC channel.
 */
export const launchWorkerProcess: WorkerLauncher = () => {
  workerCache ??= { dir: process.env.NODE_COMPILE_CACHE ? undefined : workerCompileCacheDir() };
  const child = spawn('setpriv', ['--pdeathsig', 'KILL', process.execPath, WORKER_SCRIPT], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    env: workerCache.dir ? { ...process.env, NODE_COMPILE_CACHE: workerCache.dir } : process.env,
  });
  // A failed spawn (setpriv or node missing) must end the job as a dead worker, not crash
  // the service: report it as an exit if Node does not emit one itself.
  let exited = false;
  child.once('exit', () => (exited = true));
  child.once('error', () => {
    setImmediate(() => {
      if (!exited) child.emit('exit', child.exitCode, child.signalCode);
    });
  });
  return {
    get pid() {
      return child.pid;
    },
    send: (msg) => {
      if (child.connected) child.send(msg);
    },
    kill: (signal) => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    },
    on(event: 'message' | 'exit', fn: (...args: never[]) => void) {
      child.on(event, fn as (...args: unknown[]) => void);
      return this;
    },
  } as WorkerHandle;
};

/** The workers' compile cache directory, looked up once (dir undefined: none). */
let workerCache: { dir: string | undefined } | undefined;

/**
 * Where the copy workers keep node's compile cache (NODE_COMPILE_CACHE). A worker starts for every
 * job (the replacement warm worker loads its modules while the job runs, on the same cores), and
 * loading them from cached compiled code takes ≈ 40 % less CPU (0.17 → 0.10 s measured here). The
 * directory must be this user's only (created 0700, not a link, owned by us, no group/other
 * access): compiled code from a directory others can write would run code they chose. Anything
 * else means no cache (undefined), never a failure.
 */
export function workerCompileCacheDir(base = os.tmpdir()): string | undefined {
  const uid = process.getuid?.() ?? -1;
  const dir = path.join(base, `sdmesh-data-mover-compile-cache-${uid}`);
  try {
    fs.mkdirSync(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return undefined;
  }
  const st = fs.lstatSync(dir, { throwIfNoEntry: false });
  if (!st?.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) return undefined;
  return dir;
}

const TERMINAL = new Set([pb.JobStatus.JOB_STATUS_DONE, pb.JobStatus.JOB_STATUS_ABORTED, pb.JobStatus.JOB_STATUS_FAILED]);
const JOB_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

interface JobEntry {
  job: pb.Job;
  spec: CopyJobSpec;
  /** Source and destination as "domain id/volume id" (destination: one job at a time). */
  destinationKey: string;
  domainIds: string[];
  worker?: WorkerHandle;
  result?: { type: 'done'; generation: number; verified: boolean; bytesFreed?: number } | { type: 'failed'; error: WireError };
  abortReason?: string;
  killTimer?: NodeJS.Timeout;
  startedAt?: number;
  lastPercent: number;
  progressSamples: Array<{ t: number; bytes: number }>;
  lastEventAt: number;
  finishedAt?: number;
  changed: EventEmitter;
  ended: Promise<void>;
  markEnded: () => void;
}

export interface JobManagerOptions {
  hostName: string;
  maxConcurrentJobs: number;
  /** Empty: copies are refused (FAILED_PRECONDITION NO_LEASE_MANAGER). */
  workerConfig: WorkerConfig;
  registry: Registry;
  events?: EventPublisher;
  log: Logger;
  launchWorker?: WorkerLauncher;
  /** How long finished jobs stay visible (GetJob, idempotent CopyVolume). */
  retentionMs?: number;
  /** After an abort, how long the worker gets to stop qemu-img and release its leases before SIGKILL. */
  abortGraceMs?: number;
  /**
   * Idle, pre-started workers to keep (modules loaded, registered, waiting for 'start') so a job
   * does not pay the process start (≈ 0.25 s here, seconds on a loaded host). Default 3: a job
   * takes the oldest ready one, and the replacement can wait until that job holds its leases (see
   * start) while the others wait for the next jobs; a starting worker is stopped during jobs' fixed
   * phases (pauseStarting), so it takes longer to be ready, and with 2 the back-to-back jobs of the
   * bench found it unrehearsed 18 times of 27 (3 of 27 with 3). 0: none (every job starts a
   * worker). Only when a lease-manager is set.
   */
  warmWorkers?: number;
  now?: () => number;
}

/**
 * The job table of one data-mover: idempotent on job id, a FIFO queue in front of
 * `maxConcurrentJobs` worker processes, progress, abort, watch, events and metrics.
 * The storage is the source of truth: the table is in memory and lost on restart (a retry
 * with the same job id then runs the copy again, which the generation check makes safe).
 */
export class JobManager {
  private readonly jobs = new Map<string, JobEntry>();
  private readonly queue: JobEntry[] = [];
  private running = 0;
  private readonly metrics: DataMoverMetrics;
  private readonly window: ThroughputWindow;
  private readonly launch: WorkerLauncher;
  private readonly now: () => number;
  private readonly gaugeTimer: NodeJS.Timeout;
  private stopping = false;
  /** Directories imports may read from (the worker config's list). */
  get importDirs(): readonly string[] {
    return this.opts.workerConfig.importDirs;
  }
  /**
   * The warm workers, oldest first: started ahead of need, each runs no job and holds no lease
   * until a job takes it (then it is that job's worker, runs exactly that job and exits, like a
   * cold one).
   */
  private readonly idle: IdleWorker[] = [];
  private rewarmTimer?: NodeJS.Timeout;
  /** Jobs in a phase that is part of every job's fixed cost (see pauseStarting). */
  private readonly inFixedPhase = new Set<JobEntry>();
  /** Ends a pause of the starting workers that lasted MAX_STARTING_PAUSE_MS. */
  private pauseTimer?: NodeJS.Timeout;
  /** A pause ran out: no other until no job is in a fixed phase. */
  private pauseSpent = false;
  /** Owner of each live worker's events: a job, or none while the worker is idle. */
  private readonly owners = new Map<WorkerHandle, JobEntry | undefined>();

  constructor(private readonly opts: JobManagerOptions) {
    this.metrics = new DataMoverMetrics(opts.registry);
    this.now = opts.now ?? Date.now;
    this.window = new ThroughputWindow(60_000, this.now);
    this.launch = opts.launchWorker ?? launchWorkerProcess;
    this.gaugeTimer = setInterval(() => this.metrics.throughput.set(this.window.mbps()), 5000);
    this.gaugeTimer.unref();
    this.warmUp();
  }

  // ------------------------------------------------------------------ requests

  async copy(req: pb.CopyVolumeRequest): Promise<pb.Job> {
    const jobId = checkJobId(req.jobId);
    const existing = this.existing(jobId, req);
    if (existing) return existing;
    this.checkCanCopy(req);
    // Check now, so a bad request fails at once and writes nothing; the worker checks again under the leases.
    const endpoints = await this.resolveEndpoints(req);
    // Another call with this job id may have queued it while we resolved.
    const raced = this.existing(jobId, req);
    if (raced) return raced;
    this.checkDestinationFree(endpoints.destination);
    const entry = this.newEntry({ jobId, request: req, endpoints });
    this.enqueue(entry);
    return this.snapshot(entry);
  }

  /**
   * A volume job (volume-job.ts): checked against the volume now (nothing written), then queued
   * like a copy, with the volume as the job's destination (one writer at a time on this host).
   */
  async volumeJob(req: pb.StartVolumeJobRequest): Promise<pb.Job> {
    const jobId = checkJobId(req.jobId);
    const op = volumeOpOf(req.operation);
    if (!Number.isSafeInteger(req.generation) || req.generation < 0) {
      throw invalidArgument(`generation ${req.generation} must be a whole number ≥ 0`, Reason.INVALID_GENERATION);
    }
    const spec: CopyJobSpec = {
      jobId,
      destination: { domainPath: req.volume?.domainPath ?? '', imageId: req.volume?.imageId ?? '', volumeId: req.volume?.volumeId ?? '' },
      destinationGeneration: req.generation,
      collapse: false,
      verify: false,
      rateLimitBytesPerSecond: 0,
      volumeOp: op,
      resumeIllegal: req.resumeIllegal,
    };
    const same = () => this.existingVolumeJob(jobId, spec);
    const existing = same();
    if (existing) return existing;
    this.checkCanCopy(pb.CopyVolumeRequest.fromPartial({ destinationGeneration: req.generation }));
    const volume = await resolveVolume('volume', req.volume);
    checkVolumeJob(volume, op, { generation: req.generation, resumeIllegal: req.resumeIllegal });
    const raced = same();
    if (raced) return raced;
    this.checkDestinationFree(volume);
    spec.destination = volumeRef(volume);
    const endpoints: CopyEndpoints = { sourceFile: '', destination: volume, domainIds: [volume.domain.id], bytesTotal: volume.record.capacityBytes };
    const entry = this.newEntry({ jobId, request: pb.CopyVolumeRequest.fromPartial({}), endpoints }, spec);
    entry.job.kind = op.kind;
    this.enqueue(entry);
    return this.snapshot(entry);
  }

  /** The volume job with this id, if it is the same request (ALREADY_EXISTS JOB_ID_CONFLICT if not). */
  private existingVolumeJob(jobId: string, spec: CopyJobSpec): pb.Job | undefined {
    const e = this.jobs.get(jobId);
    if (!e) return undefined;
    const key = (s: CopyJobSpec) =>
      JSON.stringify([
        s.volumeOp,
        path.resolve(s.destination.domainPath || '/'),
        s.destination.imageId,
        s.destination.volumeId,
        s.destinationGeneration,
        !!s.resumeIllegal,
      ]);
    if (!e.spec.volumeOp || key(e.spec) !== key(spec)) throw alreadyExists(`job ${jobId} exists with a different request`, Reason.JOB_ID_CONFLICT);
    return this.snapshot(e);
  }

  get(jobId: string): pb.Job {
    return this.snapshot(this.entry(jobId));
  }

  list(): pb.Job[] {
    return [...this.jobs.values()].sort((a, b) => a.job.createTime!.getTime() - b.job.createTime!.getTime()).map((e) => this.snapshot(e));
  }

  /** Aborts a job and waits (until the signal) for it to end; a finished job is returned as it is. */
  async abort(jobId: string, reason: string, signal?: AbortSignal): Promise<pb.Job> {
    const entry = this.entry(jobId);
    if (TERMINAL.has(entry.job.status)) return this.snapshot(entry);
    const queued = this.queue.indexOf(entry);
    if (queued >= 0) {
      this.queue.splice(queued, 1);
      entry.abortReason = reason;
      this.finish(entry);
      return this.snapshot(entry);
    }
    if (entry.abortReason === undefined) {
      entry.abortReason = reason;
      this.update(entry, { status: pb.JobStatus.JOB_STATUS_ABORTING });
      this.opts.log.warn({ jobId, reason }, 'aborting copy job');
      entry.worker?.send({ type: 'abort', reason });
      entry.killTimer = setTimeout(() => {
        this.opts.log.warn({ jobId, pid: entry.worker?.pid }, 'worker did not stop after abort: SIGKILL (sanlock releases its leases)');
        entry.worker?.kill('SIGKILL');
      }, this.opts.abortGraceMs ?? 15_000);
    }
    await waitOrSignal(entry.ended, signal);
    return this.snapshot(entry);
  }

  /** The job now, then each change, until it ends (or the caller goes away). */
  async *watch(jobId: string, signal: AbortSignal): AsyncGenerator<pb.Job> {
    const entry = this.entry(jobId);
    let version = -1;
    let current = 0;
    const onChange = () => current++;
    entry.changed.on('change', onChange);
    try {
      for (;;) {
        if (version !== current) {
          // Changes while the consumer handled the last one are caught here (current moved on).
          version = current;
          const snap = this.snapshot(entry);
          yield snap;
          if (TERMINAL.has(snap.status)) return;
          continue;
        }
        if (signal.aborted) return;
        await new Promise<void>((resolve) => {
          const done = () => {
            entry.changed.off('change', done);
            signal.removeEventListener('abort', done);
            resolve();
          };
          entry.changed.on('change', done);
          signal.addEventListener('abort', done);
        });
      }
    } finally {
      entry.changed.off('change', onChange);
    }
  }

  load(): pb.HostLoad {
    return { runningJobs: this.running, queuedJobs: this.queue.length, recentMbps: round2(this.window.mbps()), maxConcurrentJobs: this.opts.maxConcurrentJobs };
  }

  /** Shutdown: the idle workers are killed, queued jobs are aborted, running ones are aborted and awaited (bounded). */
  async stop(timeoutMs = 15_000): Promise<void> {
    this.stopping = true;
    clearInterval(this.gaugeTimer);
    clearTimeout(this.rewarmTimer);
    clearTimeout(this.pauseTimer);
    const idle = this.idle.splice(0);
    // They hold no lease and run nothing: no grace needed. Awaited so no process outlives us.
    for (const w of idle) w.worker.kill('SIGKILL');
    const active = [...this.jobs.values()].filter((e) => !TERMINAL.has(e.job.status));
    await Promise.race([
      Promise.all([...active.map((e) => this.abort(e.job.id, 'the data-mover is shutting down')), ...idle.map((w) => w.exited)]),
      new Promise((r) => setTimeout(r, timeoutMs).unref()),
    ]);
    for (const e of active) e.worker?.kill('SIGKILL');
  }

  // ------------------------------------------------------------------ internals

  /** The request's numbers are sane, and this data-mover can copy at all (now). */
  private checkCanCopy(req: pb.CopyVolumeRequest): void {
    if (!Number.isSafeInteger(req.destinationGeneration) || req.destinationGeneration < 0) {
      throw invalidArgument(`destination_generation ${req.destinationGeneration} must be a whole number ≥ 0`, Reason.INVALID_GENERATION);
    }
    if (!Number.isSafeInteger(req.rateLimitBytesPerSecond) || req.rateLimitBytesPerSecond < 0) {
      throw invalidArgument(`rate_limit_bytes_per_second ${req.rateLimitBytesPerSecond} must be ≥ 0`, Reason.INVALID_RATE_LIMIT);
    }
    if (!this.opts.workerConfig.leaseManagerAddress) {
      throw failedPrecondition(
        'this data-mover has no lease-manager (--lease-manager-address): it cannot take volume leases, so it copies nothing',
        Reason.NO_LEASE_MANAGER,
      );
    }
    if (this.stopping) throw fail(Reason.SHUTTING_DOWN, 'the data-mover is shutting down');
  }

  /** Finds the source (a volume or a host file) and the destination, and checks the copy between them. */
  private async resolveEndpoints(req: pb.CopyVolumeRequest): Promise<CopyEndpoints> {
    const sourceFile = req.sourceFile ?? '';
    if (sourceFile && req.source) throw invalidArgument('give either source (a volume) or source_file (a host file), not both', Reason.SOURCE_CONFLICT);
    if (sourceFile && req.merge) throw invalidArgument('a merge is between two volumes of a chain, not from a host file', Reason.SOURCE_CONFLICT);
    if (sourceFile) {
      const file = await inspectSourceFile(sourceFile, this.importDirs);
      const destination = await resolveVolume('destination', req.destination);
      checkImport(file, destination, { destinationGeneration: req.destinationGeneration });
      return { sourceFile, sourceIdentity: file.identity, destination, domainIds: [destination.domain.id], bytesTotal: file.virtualSize };
    }
    if (req.merge && req.collapse) throw invalidArgument('a merge keeps the chain: collapse does not apply', Reason.INVALID_ARGUMENT);
    // Independent reads: at once (each is a few file reads; a job's fixed cost, docs/data-mover.md).
    const [source, destination] = await Promise.all([resolveVolume('source', req.source), resolveVolume('destination', req.destination)]);
    if (req.merge) checkMerge(source, destination, { destinationGeneration: req.destinationGeneration });
    else checkCopy(source, destination, { collapse: req.collapse, destinationGeneration: req.destinationGeneration });
    return {
      sourceFile,
      source: { domainPath: source.domain.path, imageId: source.imageId, volumeId: source.volumeId },
      destination,
      domainIds: [destination.domain.id, source.domain.id],
      bytesTotal: source.record.capacityBytes,
      leaseSlots: { source: leaseSlotOf(source), destination: leaseSlotOf(destination) },
    };
  }

  /** One job at a time writes a destination volume (on this host). */
  private checkDestinationFree(destination: ResolvedVolume): void {
    const key = destinationKeyOf(destination);
    const busy = [...this.jobs.values()].find((e) => e.destinationKey === key && !TERMINAL.has(e.job.status));
    if (busy) {
      throw aborted(
        `destination volume ${destination.volumeId} is already being written by job ${busy.job.id} on this host (${this.opts.hostName})`,
        Reason.DESTINATION_BUSY,
      );
    }
  }

  /** A queued job: the job as clients see it, the spec its worker gets, and its bookkeeping. */
  private newEntry(newJob: NewJob, spec: CopyJobSpec = workerSpec(newJob)): JobEntry {
    let markEnded!: () => void;
    const ended = new Promise<void>((r) => (markEnded = r));
    const entry: JobEntry = {
      job: this.queuedJob(newJob),
      spec,
      destinationKey: destinationKeyOf(newJob.endpoints.destination),
      domainIds: newJob.endpoints.domainIds,
      lastPercent: 0,
      progressSamples: [],
      lastEventAt: 0,
      changed: new EventEmitter(),
      ended,
      markEnded,
    };
    entry.changed.setMaxListeners(0);
    return entry;
  }

  private queuedJob({ jobId, endpoints }: NewJob): pb.Job {
    const at = new Date(this.now());
    return {
      id: jobId,
      status: pb.JobStatus.JOB_STATUS_QUEUED,
      progress: { percent: 0, bytesDone: 0, bytesTotal: endpoints.bytesTotal, mbps: 0 },
      error: undefined,
      source: endpoints.source && { ...endpoints.source },
      sourceFile: endpoints.sourceFile,
      destination: volumeRef(endpoints.destination),
      host: this.opts.hostName,
      createTime: at,
      updateTime: at,
      resultGeneration: 0,
      phase: 'waiting',
      verified: false,
      destinationMarkedIllegal: false,
      kind: endpoints.sourceFile ? 'import' : 'copy',
      bytesFreed: 0,
    };
  }

  /** Adds the job to the table and the queue, and starts it if a worker slot is free. */
  private enqueue(entry: JobEntry): void {
    this.sweep();
    this.jobs.set(entry.job.id, entry);
    this.queue.push(entry);
    const { source, sourceFile, destination, destinationGeneration } = entry.spec;
    this.opts.log.info({ jobId: entry.job.id, source, sourceFile, destination, generation: destinationGeneration }, 'copy job queued');
    this.updateGauges();
    this.pump();
  }

  private existing(jobId: string, req: pb.CopyVolumeRequest): pb.Job | undefined {
    const e = this.jobs.get(jobId);
    if (!e) return undefined;
    const s = e.spec;
    const same =
      !s.volumeOp &&
      (s.source ? sameRef(s.source, req.source) : !req.source) &&
      (s.sourceFile ?? '') === (req.sourceFile ?? '') &&
      sameRef(s.destination, req.destination) &&
      s.destinationGeneration === req.destinationGeneration &&
      s.collapse === req.collapse &&
      !!s.merge === req.merge &&
      s.verify === req.verify &&
      s.rateLimitBytesPerSecond === req.rateLimitBytesPerSecond;
    if (!same) throw alreadyExists(`job ${jobId} exists with a different request`, Reason.JOB_ID_CONFLICT);
    return this.snapshot(e);
  }

  private entry(jobId: string): JobEntry {
    const e = typeof jobId === 'string' ? this.jobs.get(jobId) : undefined;
    if (!e) throw notFound(`no job ${JSON.stringify(jobId)} on this host (${this.opts.hostName})`, Reason.JOB_NOT_FOUND);
    return e;
  }

  private pump(): void {
    while (!this.stopping && this.running < this.opts.maxConcurrentJobs && this.queue.length) this.start(this.queue.shift()!);
    this.updateGauges();
  }

  /**
   * Starts a worker process whose events go to its owner job (none while idle). An idle worker
   * that exits (killed by hand, crashed) is simply replaced, after a pause.
   */
  private launchWorker(): IdleWorker {
    const worker = this.launch();
    this.owners.set(worker, undefined);
    let markExited!: () => void;
    const launched: IdleWorker = { worker, exited: new Promise<void>((r) => (markExited = r)), ready: false, paused: false };
    worker.on('message', (msg) => {
      const owner = this.owners.get(worker);
      if (owner) this.onMessage(owner, msg);
      else if (msg.type === 'ready') launched.ready = true;
    });
    worker.on('exit', (code, signal) => {
      const owner = this.owners.get(worker);
      this.owners.delete(worker);
      markExited();
      if (owner) return void this.onExit(owner, code, signal);
      const idleAt = this.idle.findIndex((w) => w.worker === worker);
      if (idleAt >= 0) {
        this.idle.splice(idleAt, 1);
        this.opts.log.warn({ pid: worker.pid, code, signal }, 'idle copy worker exited; starting another in a while');
        this.warmUp(5000);
      }
    });
    // Registers with sanlock and connects to the lease-manager now, before any job.
    worker.send({ type: 'prepare', config: this.opts.workerConfig });
    // Started while a job is in a fixed phase: it loads once that phase is over.
    if (this.inFixedPhase.size && !this.pauseSpent) {
      this.pause(launched);
      this.armPauseTimer();
    }
    return launched;
  }

  /**
   * A warm worker that is still starting (node loading its modules, registering, rehearsing: ≈ 0.1 s
   * of CPU) is stopped (SIGSTOP) while a job of this host is in a phase that every job pays whatever
   * its size — from its start until it holds its leases and marked its destination ILLEGAL, and its
   * commit — and continued (SIGCONT) when no job is, so it loads beside a copy's data or between
   * jobs instead of competing with a job's start for the CPU (issue 17: on 2 cores that contention
   * was most of a back-to-back job's fixed cost). Without CAP_SYS_NICE a process cannot get its
   * priority back once lowered; stopping our own idle child needs no privilege. An idle worker
   * holds no lease and no lock anyone waits for, so stopping it delays nothing but its own start.
   * A pause lasts at most MAX_STARTING_PAUSE_MS (a job may wait minutes for a shared source
   * lease): then the workers continue, and are not stopped again until no job is in a fixed phase.
   */
  private pauseStarting(): void {
    if (this.pauseSpent) return;
    for (const w of this.idle) if (!w.ready) this.pause(w);
    this.armPauseTimer();
  }

  private armPauseTimer(): void {
    this.pauseTimer ??= setTimeout(() => {
      this.pauseSpent = true;
      this.continueStarting();
    }, MAX_STARTING_PAUSE_MS);
    this.pauseTimer.unref?.();
  }

  private pause(w: IdleWorker): void {
    if (w.paused) return;
    w.paused = true;
    w.worker.kill('SIGSTOP');
  }

  /** Continues the workers pauseStarting stopped. */
  private continueStarting(): void {
    clearTimeout(this.pauseTimer);
    this.pauseTimer = undefined;
    for (const w of this.idle) this.unpause(w);
  }

  private unpause(w: IdleWorker): void {
    if (!w.paused) return;
    w.paused = false;
    w.worker.kill('SIGCONT');
  }

  /** A job enters a phase whose time is every job's fixed cost (see pauseStarting). */
  private enterFixedPhase(entry: JobEntry): void {
    this.inFixedPhase.add(entry);
    this.pauseStarting();
  }

  /**
   * A job leaves its fixed phase (its data moves, or it ended): the starting workers continue once no
   * job is in one — after this turn of the event loop, so what the job's change sends now (its
   * watchers' update at DONE) goes out before they compete for the CPU again.
   */
  private leaveFixedPhase(entry: JobEntry): void {
    if (!this.inFixedPhase.delete(entry) || this.inFixedPhase.size) return;
    setImmediate(() => {
      if (this.inFixedPhase.size) return;
      this.pauseSpent = false;
      this.continueStarting();
    });
  }

  /** Keeps `warmWorkers` idle workers ready (when copies are possible at all). */
  private warmUp(delayMs = 0): void {
    const wanted = this.opts.warmWorkers ?? 3;
    if (wanted <= 0 || !this.opts.workerConfig.leaseManagerAddress) return;
    if (delayMs > 0) {
      clearTimeout(this.rewarmTimer);
      this.rewarmTimer = setTimeout(() => this.warmUp(), delayMs);
      this.rewarmTimer.unref();
      return;
    }
    clearTimeout(this.rewarmTimer);
    try {
      while (!this.stopping && this.idle.length < wanted) this.idle.push(this.launchWorker());
    } catch (err) {
      this.opts.log.warn({ err: String(err) }, 'cannot pre-start a copy worker; jobs start cold');
      this.warmUp(5000);
    }
  }

  private start(entry: JobEntry): void {
    this.running++;
    entry.startedAt = this.now();
    let worker: WorkerHandle;
    // The oldest ready idle worker (else the oldest, the likeliest to be ready soon).
    const readyAt = this.idle.findIndex((w) => w.ready);
    const idle = this.idle.splice(Math.max(0, readyAt), 1)[0];
    if (idle) this.unpause(idle);
    try {
      worker = idle?.worker ?? this.launchWorker().worker;
    } catch (err) {
      entry.result = {
        type: 'failed',
        error: { code: GrpcStatus.INTERNAL, message: `cannot start a copy worker: ${String(err)}`, reason: Reason.WORKER_START_FAILED },
      };
      this.running--;
      this.finish(entry);
      return;
    }
    entry.worker = worker;
    this.owners.set(worker, entry);
    worker.send({ type: 'start', job: entry.spec, config: this.opts.workerConfig });
    this.enterFixedPhase(entry);
    // The next job finds a warm worker again (this one runs only this job). Its replacement loads
    // its modules on the same cores as this job: while another warm worker waits for the next job,
    // it starts once this job holds its leases (onMessage 'marked-illegal', or at the job's end if
    // it never gets there), so it loads beside the copy's data, not beside the job's start (issue
    // 17: a tiny job's fixed cost +50 -> +43 ms, the same jobs alternating in one run). With none
    // left it starts now: the next job would otherwise start a cold one. (At the job's end it was
    // not ready for back-to-back jobs with one warm worker: 3 of 9 found it prepared, measured.)
    if (!this.idle.length) this.warmUp();
    this.update(entry, { status: pb.JobStatus.JOB_STATUS_RUNNING, phase: 'acquiring-leases' });
    this.publish(entry, pb.JobEvent_Kind.KIND_STARTED);
    this.opts.log.info({ jobId: entry.job.id, workerPid: worker.pid, warm: !!idle }, 'copy job started');
  }

  private onMessage(entry: JobEntry, msg: WorkerToParent): void {
    switch (msg.type) {
      case 'ready':
      case 'registered':
        return;
      case 'phase':
        // Committing is every job's fixed cost again; the other phases after the leases move data.
        if (msg.phase === 'committing') this.enterFixedPhase(entry);
        else if (msg.phase !== 'acquiring-leases') this.leaveFixedPhase(entry);
        return this.update(entry, { phase: msg.phase satisfies JobPhase });
      case 'marked-illegal':
        // The job holds its leases: its replacement may load now (see start), and starting workers continue (pauseStarting).
        this.leaveFixedPhase(entry);
        this.warmUp();
        return this.update(entry, { destinationMarkedIllegal: true });
      case 'progress':
        return this.onProgress(entry, msg.percent, msg.dataBytes, msg.totalBytes);
      case 'done':
        entry.result = msg;
        // The worker reports done after its writer exited and its leases were released (the
        // record says LEGAL): the job is DONE now, not when the process is gone a moment later.
        // An aborted job still ends at the exit (AbortJob promises no process is left).
        if (entry.abortReason === undefined) this.finish(entry);
        return;
      case 'failed':
        entry.result = msg;
        return;
    }
  }

  private onProgress(entry: JobEntry, percent: number, dataBytes: number, totalBytes: number): void {
    const delta = Math.max(0, percent - entry.lastPercent);
    entry.lastPercent = Math.max(entry.lastPercent, percent);
    const copied = Math.round((dataBytes * delta) / 100);
    if (copied > 0) {
      this.metrics.bytesCopied.inc(copied);
      this.window.add(copied);
    }
    const t = this.now();
    const bytesDone = Math.round((totalBytes * entry.lastPercent) / 100);
    entry.progressSamples.push({ t, bytes: Math.round((dataBytes * entry.lastPercent) / 100) });
    while (entry.progressSamples.length > 2 && t - entry.progressSamples[0]!.t > 5000) entry.progressSamples.shift();
    const first = entry.progressSamples[0]!;
    const mbps = t > first.t ? (entry.progressSamples.at(-1)!.bytes - first.bytes) / 1e6 / ((t - first.t) / 1000) : 0;
    this.update(entry, { progress: { percent: entry.lastPercent, bytesDone, bytesTotal: totalBytes, mbps: round2(mbps) } });
    if (t - entry.lastEventAt >= 1000) {
      entry.lastEventAt = t;
      this.publish(entry, pb.JobEvent_Kind.KIND_PROGRESS);
    }
  }

  private async onExit(entry: JobEntry, code: number | null, signal: NodeJS.Signals | null): Promise<void> {
    this.running--;
    clearTimeout(entry.killTimer);
    this.leaveFixedPhase(entry);
    // A job that ended before it held its leases has its worker replaced now (see start).
    this.warmUp();
    // Finished already at its done report: the slot frees now.
    if (entry.finishedAt !== undefined) return this.pump();
    if (!entry.result && entry.abortReason === undefined) {
      entry.result = { type: 'failed', error: await this.explainDeath(entry, code, signal) };
    }
    this.finish(entry);
    this.pump();
  }

  /** A worker that died without reporting: killed by sanlock (lockspace lost), by hand, or crashed. */
  private async explainDeath(entry: JobEntry, code: number | null, signal: NodeJS.Signals | null): Promise<WireError> {
    const how = signal ? `was killed (${signal})` : `exited with code ${code}`;
    const tail = entry.job.destinationMarkedIllegal ? '; the destination stays ILLEGAL' : '';
    const lost = await this.lostLockspaces(entry.domainIds);
    if (lost.length) {
      return {
        code: GrpcStatus.ABORTED,
        message: `copy worker pid ${entry.worker?.pid} ${how}: this host lost lockspace ${lost.join(', ')}, so sanlock fenced the worker${tail}`,
        reason: Reason.LEASE_LOST,
      };
    }
    return { code: GrpcStatus.INTERNAL, message: `copy worker pid ${entry.worker?.pid} ${how} before it reported a result${tail}`, reason: Reason.WORKER_DIED };
  }

  private async lostLockspaces(domainIds: string[]): Promise<string[]> {
    const client = localLeaseManagerClient(this.opts.workerConfig.leaseManagerAddress);
    try {
      const { lockspaces } = await client.listLockspaces({}, { timeoutMs: 2000 });
      return lockspaces
        .filter(
          (l) => domainIds.includes(l.name) && l.state !== pb.LockspaceState.LOCKSPACE_STATE_JOINED && l.state !== pb.LockspaceState.LOCKSPACE_STATE_JOINING,
        )
        .map((l) => `${l.name} (${pb.LockspaceState[l.state]})`);
    } catch {
      return [];
    } finally {
      client.close();
    }
  }

  private finish(entry: JobEntry): void {
    const r = entry.result;
    let status: pb.JobStatus;
    let error: WireError | undefined;
    let kind: pb.JobEvent_Kind;
    if (r?.type === 'done') {
      status = pb.JobStatus.JOB_STATUS_DONE;
      kind = pb.JobEvent_Kind.KIND_FINISHED;
      entry.job.resultGeneration = r.generation;
      entry.job.verified = r.verified;
      entry.job.bytesFreed = r.bytesFreed ?? 0;
    } else if (entry.abortReason !== undefined) {
      status = pb.JobStatus.JOB_STATUS_ABORTED;
      kind = pb.JobEvent_Kind.KIND_ABORTED;
      const tail = entry.job.destinationMarkedIllegal ? '; the destination stays ILLEGAL' : '';
      error = { code: GrpcStatus.ABORTED, message: `job aborted: ${entry.abortReason}${tail}`, reason: Reason.ABORTED };
    } else {
      status = pb.JobStatus.JOB_STATUS_FAILED;
      kind = pb.JobEvent_Kind.KIND_FAILED;
      error = r?.type === 'failed' ? r.error : { code: GrpcStatus.INTERNAL, message: 'job ended without a result', reason: Reason.INTERNAL };
    }
    const seconds = entry.startedAt !== undefined ? (this.now() - entry.startedAt) / 1000 : 0;
    const result = status === pb.JobStatus.JOB_STATUS_DONE ? 'done' : status === pb.JobStatus.JOB_STATUS_ABORTED ? 'aborted' : 'failed';
    if (entry.spec.volumeOp) this.metrics.volumeJobs.inc({ kind: entry.spec.volumeOp.kind, result });
    if (entry.spec.volumeOp && entry.startedAt !== undefined) this.metrics.volumeJobDuration.observe({ kind: entry.spec.volumeOp.kind }, seconds);
    if (entry.job.bytesFreed) this.metrics.bytesFreed.inc(entry.job.bytesFreed);
    if (entry.startedAt !== undefined && !entry.spec.volumeOp)
      this.metrics.copyDuration.observe(
        { result: status === pb.JobStatus.JOB_STATUS_DONE ? 'done' : status === pb.JobStatus.JOB_STATUS_ABORTED ? 'aborted' : 'failed' },
        seconds,
      );
    if (error) this.metrics.failures.inc({ reason: error.reason });
    entry.finishedAt = this.now();
    this.leaveFixedPhase(entry);
    this.update(entry, { status, error, phase: '' });
    this.publish(entry, kind);
    this.metrics.throughput.set(this.window.mbps());
    this.updateGauges();
    const logFields = { jobId: entry.job.id, status: pb.JobStatus[status], seconds, error, generation: entry.job.resultGeneration };
    if (status === pb.JobStatus.JOB_STATUS_DONE) this.opts.log.info(logFields, 'copy job done');
    else this.opts.log.warn(logFields, 'copy job ended without success');
    entry.markEnded();
  }

  private update(entry: JobEntry, patch: Partial<pb.Job>): void {
    Object.assign(entry.job, patch, { updateTime: new Date(this.now()) });
    entry.changed.emit('change');
  }

  private publish(entry: JobEntry, kind: pb.JobEvent_Kind): void {
    this.opts.events?.publish({ $case: 'job', job: { kind, jobId: entry.job.id, progress: { ...entry.job.progress! }, error: entry.job.error } });
  }

  private snapshot(entry: JobEntry): pb.Job {
    const j = entry.job;
    return {
      ...j,
      progress: j.progress && { ...j.progress },
      error: j.error && { ...j.error },
      source: j.source && { ...j.source },
      destination: j.destination && { ...j.destination },
    };
  }

  private updateGauges(): void {
    this.metrics.jobsRunning.set(this.running);
    this.metrics.jobsQueued.set(this.queue.length);
  }

  /** Forgets finished jobs after the retention time (and keeps at most 1000 of them). */
  private sweep(): void {
    const cutoff = this.now() - (this.opts.retentionMs ?? 3_600_000);
    const finished = [...this.jobs.values()].filter((e) => e.finishedAt !== undefined);
    finished.forEach((e, i) => {
      if (e.finishedAt! < cutoff || finished.length - i > 1000) this.jobs.delete(e.job.id);
    });
  }
}

/** A warm worker waiting for a job. */
interface IdleWorker {
  worker: WorkerHandle;
  exited: Promise<void>;
  /** It reported that it is done starting (loaded, registered, rehearsed). */
  ready: boolean;
  /** Stopped by pauseStarting (SIGSTOP) until continued. */
  paused: boolean;
}

/** The longest a starting worker stays stopped while jobs are in their fixed phases (see pauseStarting). */
const MAX_STARTING_PAUSE_MS = 300;

/** Where a copy reads and writes, resolved and checked before the job is queued. */
interface CopyEndpoints {
  /** The host file an import reads; empty for a volume copy. */
  sourceFile: string;
  /** The source volume; absent for an import. */
  source?: CopyJobSpec['source'];
  /** The host file as inspected (the worker checks it is still the same file); imports only. */
  sourceIdentity?: CopyJobSpec['sourceIdentity'];
  destination: ResolvedVolume;
  /** Lockspaces the job depends on: the destination's, then the source volume's. */
  domainIds: string[];
  bytesTotal: number;
  /** A copy or merge: the volumes' leases as their records named them here (the worker takes them first). */
  leaseSlots?: CopyJobSpec['leaseSlots'];
}

interface NewJob {
  jobId: string;
  request: pb.CopyVolumeRequest;
  endpoints: CopyEndpoints;
}

/** What the worker is told to do. */
function workerSpec({ jobId, request: req, endpoints }: NewJob): CopyJobSpec {
  return {
    jobId,
    source: endpoints.source,
    sourceFile: endpoints.sourceFile || undefined,
    sourceIdentity: endpoints.sourceIdentity,
    destination: volumeRef(endpoints.destination),
    destinationGeneration: req.destinationGeneration,
    collapse: req.collapse,
    verify: req.verify,
    rateLimitBytesPerSecond: req.rateLimitBytesPerSecond,
    merge: req.merge,
    leaseSlots: endpoints.leaseSlots,
  };
}

const leaseSlotOf = (v: ResolvedVolume): LeaseSlot => ({ domainId: v.domain.id, slot: v.record.leaseSlot });

function checkJobId(jobId: unknown): string {
  if (typeof jobId !== 'string' || !JOB_ID_RE.test(jobId)) {
    throw invalidArgument(`job_id ${JSON.stringify(jobId)} must be 1..128 characters of [A-Za-z0-9._:-] (a UUID is best)`, Reason.INVALID_JOB_ID);
  }
  return jobId;
}

const destinationKeyOf = (v: ResolvedVolume) => `${v.domain.id}/${v.volumeId}`;

/** A fresh ref each call: the job and its spec must not share one. */
const volumeRef = (v: ResolvedVolume) => ({ domainPath: v.domain.path, imageId: v.imageId, volumeId: v.volumeId });

function sameRef(a: NonNullable<CopyJobSpec['source']>, b: pb.VolumeRef | undefined): boolean {
  return !!b && path.resolve(a.domainPath) === path.resolve(b.domainPath || '/') && a.imageId === b.imageId && a.volumeId === b.volumeId;
}

const round2 = (x: number) => Math.round(x * 100) / 100;

async function waitOrSignal(p: Promise<void>, signal?: AbortSignal): Promise<void> {
  if (!signal) return p;
  if (signal.aborted) return;
  await new Promise<void>((resolve) => {
    signal.addEventListener('abort', () => resolve(), { once: true });
    void p.then(resolve);
  });
}
