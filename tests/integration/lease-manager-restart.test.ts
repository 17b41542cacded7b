import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pb } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { AnswerLosingProxy } from '../harness/answer-losing-proxy';
import { DataMoverMesh, MiB, volumeFile, writeRandom } from '../harness/data-mover-mesh';
import { TestLeaseHolder } from '../harness/lease-holder';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * Lease holders across a restart of their host's lease-manager (chaos runs: every data job whose
 * worker asked for its leases while the lease-manager restarted ended FAILED UNAVAILABLE). Real
 * parts: a sanlock daemon, the lease-manager as deployed (its held-lease table in a state
 * directory) SIGKILLed and started again by LocalMesh's supervisor after 2 s, as Kubernetes
 * would; metadata-tx and a data-mover whose copy worker is the holder.
 */
describe('lease holders across a SIGKILL and restart of the lease-manager', () => {
  const work = makeTestDir('lm-restart');
  const auditLog = path.join(work, 'audit.jsonl');
  const stateDir = path.join(work, 'lease-manager-state');
  const mesh = new DataMoverMesh(1, { SDMESH_STATE_DIR: stateDir, SDMESH_AUDIT_LOG: auditLog }, undefined, { restart: { initialBackoffMs: 2000 } });
  let domainA: { id: string; path: string };
  let domainB: { id: string; path: string };

  const leaseManagerPid = () => mesh.service(1, 'lease-manager').process.pid;

  /** SIGKILLs the lease-manager; resolves once the supervisor has started another one (answering on its socket). */
  const killLeaseManager = async (): Promise<number> => {
    const old = leaseManagerPid();
    process.kill(old, 'SIGKILL');
    await waitFor('the lease-manager started again', () => (leaseManagerPid() !== old ? true : undefined), 60_000, 100);
    return old;
  };

  /** Log lines (JSON) of a service of host1 that match. */
  const logLines = (service: 'data-mover' | 'lease-manager', match: (l: Record<string, unknown>) => boolean) =>
    fs
      .readFileSync(path.join(mesh.mesh.logDir, `host1-${service}.log`), 'utf8')
      .split('\n')
      .flatMap((line) => {
        try {
          const l = JSON.parse(line) as Record<string, unknown>;
          return match(l) ? [l] : [];
        } catch {
          return [];
        }
      });

  /** The audit trail's grants and releases of one holder pid for one resource, in time order. */
  const leaseHistory = (pid: number, resource: string): string[] =>
    fs
      .readFileSync(auditLog, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { t: number; kind: string; pid: number; resource?: string })
      .filter((l) => l.pid === pid && l.resource === resource && l.kind.startsWith('lease-'))
      .sort((a, b) => a.t - b.t)
      .map((l) => l.kind);

  /** Resource leases sanlock's daemon of the host has, as `sanlock client status` prints them ("r <lockspace>:<resource>:..."). */
  const sanlockResources = (): string[] =>
    execFileSync('sanlock', ['client', 'status'], { env: { ...process.env, ...mesh.mesh.hosts[0]!.sanlock.env }, encoding: 'utf8' })
      .split('\n')
      .filter((l) => l.startsWith('r '));

  /** Nothing held: neither in the lease-manager's table nor in sanlock (a dead holder's leases leave the table after its grace period). */
  const expectNoLeases = async () => {
    await waitFor(
      'the lease-manager to list no held lease',
      async () => ((await mesh.host(1).leases.listHeldLeases({})).leases.length === 0 ? true : undefined),
      30_000,
      200,
    );
    expect(sanlockResources()).toEqual([]);
  };

  beforeAll(async () => {
    await mesh.start();
    domainA = await mesh.formatDomain('domain-a');
    domainB = await mesh.formatDomain('domain-b');
  });
  afterAll(async () => {
    await mesh.stop();
    removeTestDir(work);
  });

  it("a copy job whose worker is asking for its leases when the lease-manager is SIGKILLed: the worker tries again until the restarted lease-manager answers, the job ends DONE with the source's data, no lease left", async () => {
    const source = await mesh.createVolume(domainA, { format: 'RAW', capacity: 32 * MiB });
    writeRandom(volumeFile(source.ref), 0, 4);
    writeRandom(volumeFile(source.ref), 20, 4);
    const destination = await mesh.createVolume(domainB, { format: 'RAW', capacity: 32 * MiB, illegal: true });
    // The lease-manager stopped, the worker's AcquireLeases waits on its socket, unanswered: then the kill lands while it asks.
    const stopped = leaseManagerPid();
    process.kill(stopped, 'SIGSTOP');
    const jobId = randomUUID();
    try {
      await mesh.host(1).mover.copyVolume({ jobId, source: source.ref, destination: destination.ref, destinationGeneration: 0, collapse: true });
      await waitFor(
        'the worker to ask for its leases',
        () => logLines('data-mover', (l) => l.jobId === jobId && l.msg === 'acquiring both volume leases at once')[0],
        60_000,
        100,
      );
    } catch (err) {
      process.kill(stopped, 'SIGCONT');
      throw err;
    }
    const workerPid = logLines('data-mover', (l) => l.jobId === jobId && l.msg === 'acquiring both volume leases at once')[0]!.pid as number;
    // Its request is on the stopped lease-manager's socket by now (written as the line was logged; the pause is for a loaded machine).
    await new Promise((r) => setTimeout(r, 500));
    expect(await killLeaseManager()).toBe(stopped);

    const states = await mesh.watchJob(1, jobId);
    const done = states.at(-1)!;
    expect([pb.JobStatus[done.status], done.error?.message]).toEqual(['JOB_STATUS_DONE', undefined]);
    expect(done.resultGeneration).toBe(1);
    const copied = await mesh.getVolume(destination.ref);
    expect({ legality: pb.Legality[copied.legality], generation: copied.generation }).toEqual({ legality: 'LEGALITY_LEGAL', generation: 1 });
    const sha = (file: string) => execFileSync('sha256sum', [file], { encoding: 'utf8' }).split(' ')[0];
    expect(sha(volumeFile(destination.ref))).toBe(sha(volumeFile(source.ref)));

    // The worker met the lease-manager's absence and tried again (without the retry the job ends FAILED UNAVAILABLE).
    expect(logLines('data-mover', (l) => l.pid === workerPid && l.msg === 'acquire: the lease-manager did not answer; trying again').length).toBeGreaterThan(0);
    // One grant of each lease to the worker, by the restarted lease-manager, released once.
    for (const volume of [source.ref.volumeId, destination.ref.volumeId]) expect(leaseHistory(workerPid, volume)).toEqual(['lease-grant', 'lease-release']);
    await expectNoLeases();
  });

  it('an AcquireLeases granted whose answer is lost as the lease-manager is SIGKILLed: the holder releases that grant through the restarted lease-manager, tries again and holds each lease once, nothing left after', async () => {
    const a = await mesh.createVolume(domainA, { format: 'RAW', capacity: MiB });
    const b = await mesh.createVolume(domainA, { format: 'RAW', capacity: MiB });
    const leases = [
      { location: a.lease!, mode: 'shared' as const },
      { location: b.lease!, mode: 'exclusive' as const },
    ];
    // The holder (a child of this process) reaches the lease-manager through a proxy in this process that withholds the next answer.
    const proxy = await AnswerLosingProxy.start(path.join(work, 'proxy.sock'), mesh.mesh.leaseSocket('host1'));
    const holder = await TestLeaseHolder.start({ ...mesh.mesh.hosts[0]!.sanlock.env, SDMESH_AUDIT_LOG: auditLog }, proxy.address);
    try {
      proxy.loseNextAnswer('hold');
      const holding = holder.holdMany(leases, 'op-across-restart');
      // Granted and answered (the answer held in the proxy), and in the table file a restarted lease-manager loads.
      await waitFor(
        'the grant in the held-lease table file',
        () => {
          const table = fs.readFileSync(path.join(stateDir, 'held-leases.json'), 'utf8');
          return [a, b].every((v) => table.includes(v.ref.volumeId)) ? true : undefined;
        },
        30_000,
        50,
      );
      // The table is written right after the reply goes out; the proxy (in this process) may read that reply a little later on a loaded machine.
      await waitFor('the proxy to withhold the answer', () => (proxy.lost > 0 ? true : undefined), 30_000, 20);
      expect(proxy.lost).toBe(1);
      await killLeaseManager();

      const got = await holding;
      if (!got.ok) throw new Error(`holdMany failed: ${got.error.message}`);
      const { granted, heldInside, tableInside, heldAfter } = got.result;
      expect(granted.map((l) => l.location?.resource)).toEqual([a.ref.volumeId, b.ref.volumeId]);
      // Inside the hold: each lease once in sanlock, and the restarted lease-manager's table names exactly the new grants.
      expect(heldInside.map((r) => r.name).sort()).toEqual([a.ref.volumeId, b.ref.volumeId].sort());
      // (times come as JSON strings from the holder process)
      const grants = (ls: pb.Lease[]) => ls.map((l) => `${l.location?.resource}@${new Date(l.acquireTime!).getTime()}`).sort();
      expect(grants(tableInside)).toEqual(grants(granted));
      expect(heldAfter).toEqual([]);
      // The lost grant was released before the new one: grant (lost), release, grant, release (the holder's own).
      for (const v of [a, b]) expect(leaseHistory(holder.pid, v.ref.volumeId)).toEqual(['lease-grant', 'lease-release', 'lease-grant', 'lease-release']);
      await expectNoLeases();
    } finally {
      await holder.kill();
      await proxy.stop();
    }
  });

  it("a grant the lease-manager has no record of (the dead one's request reaching sanlock after its death) while the holder waits: the holder finds it, the restarted lease-manager releases it from sanlock, then the acquire is granted once", async () => {
    const volume = await mesh.createVolume(domainA, { format: 'RAW', capacity: MiB });
    const location = volume.lease!;
    const holder = await TestLeaseHolder.start({ ...mesh.mesh.hosts[0]!.sanlock.env, SDMESH_AUDIT_LOG: auditLog }, `unix:${mesh.mesh.leaseSocket('host1')}`);
    try {
      const old = leaseManagerPid();
      process.kill(old, 'SIGKILL');
      // The holder asks while the lease-manager is away (restarted after 2 s): its tries are refused.
      const holding = holder.hold(location, 'exclusive', 'op-unrecorded');
      // What a request the dead lease-manager left in the daemon would do: sanlock grants the lease to the holder, no table has it.
      execFileSync(
        'sanlock',
        ['client', 'acquire', '-r', `${location.lockspace}:${location.resource}:${location.path}:${location.offset}`, '-p', String(holder.pid)],
        {
          env: { ...process.env, ...mesh.mesh.hosts[0]!.sanlock.env },
        },
      );
      await waitFor('the lease-manager started again', () => (leaseManagerPid() !== old ? true : undefined), 60_000, 100);
      const got = await holding;
      if (!got.ok) throw new Error(`hold failed: ${got.error.message}`);
      expect(got.result.lease.location?.resource).toBe(volume.ref.volumeId);
      expect(got.result.heldInside.map((r) => r.name)).toEqual([volume.ref.volumeId]);
      expect(got.result.heldAfter).toEqual([]);
      // The unrecorded grant released by the restarted lease-manager (from sanlock), then its own grant, released by the holder.
      expect(leaseHistory(holder.pid, volume.ref.volumeId)).toEqual(['lease-release', 'lease-grant', 'lease-release']);
      await expectNoLeases();
    } finally {
      await holder.kill();
    }
  });

  it('an acquire that waits for a lease another process holds keeps waiting across the restart, and is granted once that process releases it', async () => {
    const volume = await mesh.createVolume(domainA, { format: 'RAW', capacity: MiB });
    const location = volume.lease!;
    const socket = `unix:${mesh.mesh.leaseSocket('host1')}`;
    const env = { ...mesh.mesh.hosts[0]!.sanlock.env, SDMESH_AUDIT_LOG: auditLog };
    const [owner, waiter] = await Promise.all([TestLeaseHolder.start(env, socket), TestLeaseHolder.start(env, socket)]);
    try {
      const held = await owner.acquire(location, 'exclusive', { operationId: 'op-owner' });
      if (!held.ok) throw new Error(held.error.message);
      let settled = false;
      const waiting = waiter.acquire(location, 'exclusive', { wait: true, timeoutMs: 120_000, operationId: 'op-waiter' }).finally(() => (settled = true));
      // Its call waits in the lease-manager (or is still on its way) when the lease-manager dies.
      await new Promise((r) => setTimeout(r, 1000));
      await killLeaseManager();
      // After the restart the waiter's first try asks without waiting (a late grant of its own would show): refused, it waits again.
      const refused = (l: Record<string, unknown>) =>
        l.pid === leaseManagerPid() && JSON.stringify(l.audit ?? {}).includes('op-waiter') && (l.audit as { outcome?: string }).outcome === 'ABORTED';
      await waitFor('the restarted lease-manager to refuse that try', () => (logLines('lease-manager', refused).length ? true : undefined), 60_000, 200);
      await new Promise((r) => setTimeout(r, 2000));
      expect(settled).toBe(false);
      expect((await owner.release(location)).ok).toBe(true);
      const got = await waiting;
      if (!got.ok) throw new Error(`the waiter's acquire failed: ${got.error.message}`);
      expect(got.result.location?.resource).toBe(volume.ref.volumeId);
      expect((await waiter.release(location)).ok).toBe(true);
      expect(leaseHistory(waiter.pid, volume.ref.volumeId)).toEqual(['lease-grant', 'lease-release']);
      await expectNoLeases();
    } finally {
      await Promise.all([owner.kill(), waiter.kill()]);
    }
  });
});
