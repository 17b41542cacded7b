import { fork, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { SdmeshError, unavailable, type DomainRef, type Logger } from '@sdmesh/common';
import type { GroupedVolume } from './lease-groups';

/** gc → lease worker: hold volume leases (1..8, all or none, no wait), or release the ones held for request `release`. */
export interface WorkerRequest {
  id: number;
  hold?: { domain: DomainRef; volumes: GroupedVolume[]; operationId: string };
  release?: number;
}

/** lease worker → gc. */
export interface WorkerReply {
  id: number;
  ready?: boolean;
  acquired?: boolean;
  released?: boolean;
  error?: { code: number; message: string; reason: string };
}

interface Worker {
  child: ChildProcess;
  /** What the worker answers next for the request in hand. */
  waiting?: { resolve: (r: WorkerReply) => void; reject: (e: Error) => void };
  ready: boolean;
  dead: boolean;
}

const WORKER_SCRIPT = path.join(__dirname, 'lease-worker.js');

/**
 * V8 limits of a lease worker: it holds a few leases and passes small messages, so a 1 MiB young
 * generation (V8's default grows to 16 MiB semi-spaces, resident once used) and a 64 MiB old one
 * are plenty. The workers' memory counts against the gc container's limit: private memory per
 * worker after a 10 000-item pass 77–96 MiB before, 41–57 MiB with these and the slim entry (docs/gc.md).
 */
export const WORKER_EXEC_ARGV = ['--max-semi-space-size=1', '--max-old-space-size=64'];

/**
 * Volume leases held by lease worker processes, one group of leases (up to 8, taken in one
 * sanlock acquire; VolumeLeaseGroups) per worker at a time: sanlock runs one command per
 * registered process, so within one process the volume leases of a pass could only be taken one
 * command after another. The gc removes records while a worker holds their volume leases; the
 * worker releases them when told, before the items end, so before the batch releases the domain
 * lease. A worker that dies frees its leases at once (as an early release would): the items in
 * hand fail their next step or are done, and no create can reuse a slot before the gc releases
 * the domain lease. Workers are started on first use and live as long as the gc.
 */
export class LeaseWorkers {
  private readonly idle: Worker[] = [];
  private readonly queued: Array<{ resolve: (w: Worker) => void; reject: (e: Error) => void }> = [];
  private starting?: Promise<void>;
  private nextId = 1;
  private stopped = false;
  private readonly all = new Set<Worker>();

  constructor(private readonly opts: { count: number; leaseManagerAddress: string; log: Logger; respawnDelayMs?: number }) {}

  /** Starts the workers (once; the first lease does it too); resolves when each is ready or gone. */
  start(): Promise<void> {
    this.starting ??= Promise.all(Array.from({ length: this.opts.count }, () => this.spawn())).then(() => undefined);
    return this.starting;
  }

  private spawn(): Promise<void> {
    const child = fork(WORKER_SCRIPT, [], {
      execArgv: [...process.execArgv, ...WORKER_EXEC_ARGV],
      env: { ...process.env, SDMESH_GC_LEASE_MANAGER_ADDRESS: this.opts.leaseManagerAddress },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    const worker: Worker = { child, ready: false, dead: false };
    this.all.add(worker);
    return new Promise((resolve) => {
      child.on('message', (m: WorkerReply) => {
        if (m.ready) {
          worker.ready = true;
          this.give(worker);
          resolve();
          return;
        }
        const w = worker.waiting;
        worker.waiting = undefined;
        w?.resolve(m);
      });
      child.on('exit', (code, signal) => {
        worker.dead = true;
        this.all.delete(worker);
        const i = this.idle.indexOf(worker);
        if (i >= 0) this.idle.splice(i, 1);
        const err = unavailable(`gc lease worker pid ${child.pid} exited (${signal ?? code}): its lease is gone`);
        worker.waiting?.reject(err);
        worker.waiting = undefined;
        resolve();
        if (this.stopped) return;
        // Nobody left to hold a lease: the items waiting for one end with an error (the next pass retries them).
        if (this.all.size === 0) for (const q of this.queued.splice(0)) q.reject(err);
        this.opts.log.warn({ pid: child.pid, code, signal }, 'gc lease worker exited; starting another');
        setTimeout(() => {
          if (!this.stopped) void this.spawn();
        }, this.opts.respawnDelayMs ?? 1000).unref();
      });
    });
  }

  private give(worker: Worker): void {
    if (worker.dead) return;
    const next = this.queued.shift();
    if (next) next.resolve(worker);
    else this.idle.push(worker);
  }

  private async take(): Promise<Worker> {
    await this.start();
    const worker = this.idle.pop();
    if (worker) return worker;
    if (this.all.size === 0) throw unavailable('no gc lease worker is running (see the gc log for why they exited)');
    return new Promise((resolve, reject) => this.queued.push({ resolve, reject }));
  }

  private ask(worker: Worker, req: WorkerRequest): Promise<WorkerReply> {
    if (worker.dead || !worker.child.connected) return Promise.reject(unavailable('gc lease worker is gone'));
    return new Promise((resolve, reject) => {
      worker.waiting = { resolve, reject };
      // A worker killed before its 'exit' event came: the channel refuses (EPIPE), which is the
      // same news as the exit — UNAVAILABLE, its lease is gone.
      const gone = (err: Error) => {
        if (worker.waiting?.reject !== reject) return;
        worker.waiting = undefined;
        reject(unavailable(`gc lease worker pid ${worker.child.pid} is gone (${err.message}): its lease is gone`));
      };
      try {
        worker.child.send(req, (err) => err && gone(err));
      } catch (err) {
        gone(err as Error);
      }
    });
  }

  get count(): number {
    return this.opts.count;
  }

  /** Workers running and ready now (one that died counts again once its replacement is ready). */
  get running(): number {
    return [...this.all].filter((w) => w.ready && !w.dead).length;
  }

  /** fn while a worker holds these volumes' exclusive leases (all or none, no wait: one held elsewhere → ABORTED). */
  async holdVolumes<T>(domain: DomainRef, volumes: readonly GroupedVolume[], operationId: string, fn: () => Promise<T>): Promise<T> {
    const worker = await this.take();
    const id = this.nextId++;
    try {
      const got = await this.ask(worker, { id, hold: { domain, volumes: [...volumes], operationId } });
      if (got.error) throw new SdmeshError(got.error.code, got.error.message, got.error.reason);
      let outcome: { value: T } | { err: unknown };
      try {
        outcome = { value: await fn() };
      } catch (err) {
        outcome = { err };
      }
      const done = await this.ask(worker, { id, release: id });
      if ('err' in outcome) throw outcome.err;
      if (done.error) throw new SdmeshError(done.error.code, done.error.message, done.error.reason);
      return outcome.value;
    } finally {
      this.give(worker);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(
      [...this.all]
        .filter((w) => w.child.exitCode === null && w.child.signalCode === null)
        .map(
          (w) =>
            new Promise<void>((resolve) => {
              w.child.once('exit', () => resolve());
              if (w.child.connected) w.child.disconnect();
              else w.child.kill('SIGKILL');
            }),
        ),
    );
  }
}
