import fs from 'node:fs';
import path from 'node:path';
import { GrpcStatus, type DomainRef } from '@sdmesh/common';
import { SANLOCK_MALLOC_TUNABLES, waitFor } from '@sdmesh/localmesh';
import { LeaseWorkers, WORKER_EXEC_ARGV } from '../../services/gc/dist/lease-workers';
import { LeaseCluster } from '../harness/lease-cluster';

/**
 * The gc's lease worker processes (services/gc/dist/lease-worker.js) against a real sanlock daemon
 * and lease-manager: two workers hold a group of volume leases each at once (one sanlock acquire
 * each), a third group waits for one of them; a worker killed while holding its group frees it,
 * the items' release fails, and its replacement takes the leases.
 */
describe('gc lease workers', () => {
  const cluster = new LeaseCluster();
  const volumes = Array.from({ length: 24 }, (_, i) => ({ volumeId: `vol-${i}`, slot: i }));
  let domain: DomainRef;
  let workers: LeaseWorkers;
  const quiet = { info: () => undefined, warn: () => undefined, error: () => undefined, debug: () => undefined } as never;

  const heldBy = async () => {
    const leases = (await cluster.host(1).client.listHeldLeases({ holderPid: 0 })).leases;
    return leases.map((l) => ({ resource: l.location?.resource ?? '', pid: l.holderPid }));
  };
  /** Resolves when released() is called; the promise of the hold ends after sanlock released the group. */
  const hold = (group: typeof volumes, operationId: string) => {
    let release!: () => void;
    let held!: () => void;
    const isHeld = new Promise<void>((r) => (held = r));
    const done = workers.holdVolumes(domain, group, operationId, async () => {
      held();
      await new Promise<void>((r) => (release = r));
    });
    return { isHeld, done, release: () => release() };
  };

  beforeAll(async () => {
    await cluster.start(1);
    const d = await cluster.formatDomain(
      'ls-gc-workers',
      volumes.map((v) => v.volumeId),
    );
    domain = { id: 'ls-gc-workers', path: path.dirname(path.dirname(d.leases)) };
    await cluster.host(1).client.joinLockspace({ lockspace: 'ls-gc-workers', path: d.ids, wait: true }, { timeoutMs: 60000 });
    // The worker processes find this host's sanlock daemon and lease-manager as the gc's do.
    Object.assign(process.env, cluster.host(1).sanlock.env);
    workers = new LeaseWorkers({ count: 2, leaseManagerAddress: cluster.host(1).leaseSocket, log: quiet, respawnDelayMs: 100 });
    await workers.start();
  });
  afterAll(async () => {
    await workers?.stop();
    await cluster.stop();
  });

  it("the host's sanlock daemon runs with glibc's malloc keeping its paxos buffers (GLIBC_TUNABLES)", () => {
    // glibc's loader parses the tunables in the process's original environment block, writing a NUL
    // over each ':' there (the program gets a copy): /proc shows them as separate strings.
    const env = fs.readFileSync(`/proc/${cluster.host(1).sanlock.pid}/environ`, 'utf8').split('\0');
    const at = env.findIndex((e) => e.startsWith('GLIBC_TUNABLES='));
    expect(env.slice(at, at + 2).join(':')).toBe(`GLIBC_TUNABLES=${SANLOCK_MALLOC_TUNABLES}`);
  });

  it('the workers run with small V8 limits (their memory counts against the gc container)', () => {
    const children = fs
      .readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .flatMap((p) => {
        try {
          const stat = fs.readFileSync(`/proc/${p}/stat`, 'utf8');
          const cmdline = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
          return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === process.pid && cmdline.some((a) => a.endsWith('lease-worker.js'))
            ? [cmdline]
            : [];
        } catch {
          return [];
        }
      });
    expect(children).toHaveLength(2);
    for (const cmdline of children) expect(cmdline).toEqual(expect.arrayContaining(WORKER_EXEC_ARGV));
    expect(WORKER_EXEC_ARGV).toContain('--max-semi-space-size=1');
  });

  it('two workers hold a group each at once; a third group waits until one is released; all are released in sanlock', async () => {
    const a = hold(volumes.slice(0, 8), 'gc-a');
    const b = hold(volumes.slice(8, 12), 'gc-b');
    await Promise.all([a.isHeld, b.isHeld]);
    const both = await heldBy();
    expect(both.map((l) => l.resource).sort()).toEqual(
      volumes
        .slice(0, 12)
        .map((v) => v.volumeId)
        .sort(),
    );
    // Each group by its own worker process, none by this one.
    const pidOf = (r: string) => both.find((l) => l.resource === r)!.pid;
    expect(pidOf('vol-0')).not.toBe(pidOf('vol-8'));
    expect([pidOf('vol-0'), pidOf('vol-8')]).not.toContain(process.pid);

    const c = hold(volumes.slice(12, 16), 'gc-c');
    let cHeld = false;
    void c.isHeld.then(() => (cHeld = true));
    await new Promise((r) => setTimeout(r, 500));
    expect(cHeld).toBe(false);
    expect((await heldBy()).some((l) => l.resource === 'vol-12')).toBe(false);

    a.release();
    await a.done;
    await c.isHeld;
    // The holder tells the lease-manager of its releases after sanlock's: its table may lag a moment.
    const expected = volumes
      .slice(8, 16)
      .map((v) => v.volumeId)
      .sort();
    const now = await waitFor(
      'b and c held, a released',
      async () => {
        const l = await heldBy();
        return JSON.stringify(l.map((x) => x.resource).sort()) === JSON.stringify(expected) ? l : undefined;
      },
      10000,
      50,
    );
    // c went to the worker a freed.
    expect(now.find((l) => l.resource === 'vol-12')!.pid).toBe(pidOf('vol-0'));
    b.release();
    c.release();
    await Promise.all([b.done, c.done]);
    await waitFor('every lease released', async () => ((await heldBy()).length === 0 ? true : undefined), 10000, 50);
  });

  it("a worker killed while holding its group: that group's release fails UNAVAILABLE, the other worker's is unaffected, and the leases are free again", async () => {
    const a = hold(volumes.slice(0, 8), 'gc-kill-a');
    const b = hold(volumes.slice(16, 24), 'gc-kill-b');
    await Promise.all([a.isHeld, b.isHeld]);
    const held = await heldBy();
    expect(held).toHaveLength(16);
    const killed = held.find((l) => l.resource === 'vol-0')!.pid;
    process.kill(killed, 'SIGKILL');
    // The gc's items end their work; the release they then ask of the dead worker fails.
    a.release();
    const err = (await a.done.catch((e: unknown) => e)) as { code?: number };
    expect(err.code).toBe(GrpcStatus.UNAVAILABLE);
    b.release();
    await b.done;
    // sanlock freed them with the process; a new worker (started by LeaseWorkers) takes them.
    await waitFor('a replacement lease worker', () => (workers.running === 2 ? true : undefined), 30000, 50);
    const again = hold(volumes.slice(0, 8), 'gc-after-kill');
    await again.isHeld;
    // (The lease-manager's table may still list the dead worker's grants until it notices the exit.)
    const after = (await heldBy()).filter((l) => l.pid !== killed);
    expect(after.map((l) => l.resource).sort()).toEqual(
      volumes
        .slice(0, 8)
        .map((v) => v.volumeId)
        .sort(),
    );
    expect(after.every((l) => l.pid !== process.pid)).toBe(true);
    again.release();
    await again.done;
  });
});
