import path from 'node:path';
import { startProcess, type ManagedProcess } from '@sdmesh/localmesh';
import type { pb } from '@sdmesh/common';
import { REPO_ROOT } from './paths';

export interface HolderError {
  code: number;
  reason: string;
  message: string;
}

export type HolderResult<T = unknown> = { ok: true; result: T } | { ok: false; error: HolderError };

/** A lease-holding process on one simulated host (tests/fixtures/lease-holder-agent.js). */
export class TestLeaseHolder {
  private nextId = 1;
  private waiting = new Map<number, (r: HolderResult) => void>();
  readonly events: { event: string; [k: string]: unknown }[] = [];
  private constructor(readonly proc: ManagedProcess) {}

  static async start(sanlockEnv: Record<string, string>, leaseManagerAddress: string): Promise<TestLeaseHolder> {
    let ready!: () => void;
    const isReady = new Promise<void>((r) => (ready = r));
    // The line handler runs before the constructor returns the holder, hence the reference box.
    const ref: { holder?: TestLeaseHolder } = {};
    const proc = startProcess('lease-holder', process.execPath, [path.join(REPO_ROOT, 'tests/fixtures/lease-holder-agent.js'), leaseManagerAddress], {
      env: { ...process.env, ...sanlockEnv },
      stdin: 'pipe',
      onLine: (line, stream) => {
        if (stream !== 'stdout') return;
        const msg = JSON.parse(line) as { id?: number; event?: string } & HolderResult;
        if (msg.event) {
          ref.holder?.events.push(msg as { event: string });
          if (msg.event === 'ready') ready();
        } else if (msg.id !== undefined) {
          ref.holder?.waiting.get(msg.id)?.(msg);
          ref.holder?.waiting.delete(msg.id);
        }
      },
    });
    const holder = new TestLeaseHolder(proc);
    ref.holder = holder;
    await Promise.race([
      isReady,
      proc.exited.then((c) => {
        throw new Error(`lease holder exited (${c}) before it was ready`);
      }),
    ]);
    return holder;
  }

  get pid(): number {
    return this.proc.pid;
  }

  private send<T>(cmd: Record<string, unknown>): Promise<HolderResult<T>> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, resolve as (r: HolderResult) => void);
      this.proc.exited.then((c) => reject(new Error(`lease holder exited (${c})`))).catch(() => undefined);
      this.proc.child.stdin?.write(JSON.stringify({ id, ...cmd }) + '\n');
    });
  }

  acquire(
    location: pb.LeaseLocation,
    mode: 'exclusive' | 'shared',
    opts: { wait?: boolean; timeoutMs?: number; operationId?: string; requestIfHeld?: boolean } = {},
  ): Promise<HolderResult<pb.Lease>> {
    return this.send({ op: 'acquire', location, mode, ...opts });
  }

  release(location: pb.LeaseLocation): Promise<HolderResult> {
    return this.send({ op: 'release', location });
  }

  /** LeaseHolder.withLease around nothing, `times` in a row: the last lease, and the leases sanlock gives this process inside that hold and after it. */
  hold(
    location: pb.LeaseLocation,
    mode: 'exclusive' | 'shared',
    operationId = 'test',
    times = 1,
  ): Promise<HolderResult<{ lease: pb.Lease; heldInside: Array<{ name: string }>; heldAfter: Array<{ name: string }> }>> {
    return this.send({ op: 'hold', location, mode, operationId, times });
  }

  /** LeaseHolder.withLeases (one AcquireLeases, no wait) around nothing: the grants, and what sanlock and the lease-manager's table say inside that hold, and sanlock after it. */
  holdMany(
    leases: { location: pb.LeaseLocation; mode: 'exclusive' | 'shared' }[],
    operationId = 'test',
  ): Promise<
    HolderResult<{
      granted: pb.Lease[];
      heldInside: Array<{ name: string; lockspace: string; shared: boolean }>;
      tableInside: pb.Lease[];
      heldAfter: Array<{ name: string }>;
    }>
  > {
    return this.send({ op: 'hold-many', leases, operationId });
  }

  /** Three LeaseHolder.withLeases of the same leases at once in the holder process: the first, a second that waits, a third that does not; the order they ran in and the third's refusal. */
  holdManyOverlapping(leases: { location: pb.LeaseLocation; mode: 'exclusive' | 'shared' }[]): Promise<HolderResult<{ order: string[]; third: string }>> {
    return this.send({ op: 'hold-many-overlapping', leases });
  }

  /** AcquireLease / ReleaseLease naming another holder pid (the lease-manager must refuse it). */
  acquireFor(location: pb.LeaseLocation, holderPid: number): Promise<HolderResult<pb.Lease>> {
    return this.send({ op: 'acquire-for', location, holderPid });
  }

  releaseFor(location: pb.LeaseLocation, holderPid: number): Promise<HolderResult> {
    return this.send({ op: 'release-for', location, holderPid });
  }

  held(): Promise<HolderResult<{ name: string; lockspace: string }[]>> {
    return this.send({ op: 'held' });
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<number | string> {
    return this.proc.stop(signal);
  }
}
