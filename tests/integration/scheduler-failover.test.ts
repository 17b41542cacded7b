import { createClient, pb } from '@sdmesh/common';
import { codeOf, MiB, SchedulerMesh, sha256File, writeRandom, type PublicApi } from '../harness/scheduler-mesh';

/**
 * Failures on a real mesh (3 sanlock hosts, io_timeout 1): a scheduler replica killed mid-move
 * (another replica resumes it from KV), SPM mode (every step on the SPM host), and ONE host
 * death (kill -9 of all its processes and its sanlock daemon, ~70 s until sanlock calls it
 * dead) that hits both an SDM move's copy and the SPM: the SDM move is fenced and finishes on
 * another host, another host becomes SPM and the SPM move continues there.
 */
describe('scheduler: failures', () => {
  // Copies throttled to 8 MiB/s so they are still running when we kill things.
  const m = new SchedulerMesh(3, { SDMESH_COPY_RATE_LIMIT: String(8 * MiB) });
  let replica2: PublicApi;
  let spm: PublicApi;
  let a: pb.StorageDomain;
  let b: pb.StorageDomain;

  beforeAll(async () => {
    await m.start();
    replica2 = m.publicApi((await m.startScheduler('scheduler-2')).grpcAddress);
    spm = m.publicApi((await m.startScheduler('scheduler-spm', { SDMESH_KV_PREFIX: 'spm', SDMESH_MODE: 'spm' })).grpcAddress);
    await m.waitHealthy(3, spm);
    [a, b] = await Promise.all([m.createDomain('dom-a'), m.createDomain('dom-b')]);
  }, 120_000);
  afterAll(async () => {
    replica2?.close();
    spm?.close();
    await m.stop();
  }, 60_000);

  const running = async (api: PublicApi, name: string, pred: (op: pb.Operation) => boolean, timeoutMs = 60_000) => {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const op = await api.ops.getOperation({ name });
      if (pred(op)) return op;
      if (Date.now() > until) throw new Error(`condition not reached: ${JSON.stringify(pb.Operation.toJSON(op))}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  const copyRunning = (op: pb.Operation) =>
    op.steps.some(
      (s) => s.name.startsWith('copy-volume') && s.status === pb.OperationStatus.OPERATION_STATUS_RUNNING && s.host !== '' && (s.progress?.percent ?? 0) > 0,
    );

  test('kill -9 the scheduler mid-move: the other replica resumes the operation from KV and finishes it', async () => {
    const disk = await m.createDisk(a.id, 64 * MiB, 'disk-sched-kill');
    writeRandom(disk.volumes[0]!.path, 0, 48);
    const sum = sha256File(disk.volumes[0]!.path);
    const op = await m.api.disks.moveDisk({ requestId: 'move-sched-kill', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    await running(m.api, op.name, copyRunning);
    const first = m.replicas[0]!;
    process.kill(first.process.pid, 'SIGKILL');
    await first.process.exited;
    const final = await m.wait(op.name, replica2);
    expect(final.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const moved = await replica2.disks.getDisk({ storageDomainId: b.id, diskId: disk.id });
    expect(sha256File(moved.volumes[0]!.path)).toBe(sum);
    expect(moved.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(await codeOf(replica2.disks.getDisk({ storageDomainId: a.id, diskId: disk.id }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    // Start the killed replica again: it sees the finished operation, and the locks are free.
    const restarted = m.publicApi((await m.startScheduler('scheduler-1b')).grpcAddress);
    expect((await restarted.ops.getOperation({ name: op.name })).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    restarted.close();
  });

  test('SPM mode: one host holds the SPM lease and runs every step; its death hands SPM over and an SDM copy on it is fenced and retried elsewhere', async () => {
    // SPM scheduler: its own domains (own KV), an elected SPM, every step on it.
    const sa = await m.createDomain('spm-a', {}, spm);
    const sb = await m.createDomain('spm-b', {}, spm);
    let spmHost = '';
    for (let i = 0; i < 100 && !spmHost; i++) {
      spmHost = (await spm.hosts.listHosts({})).hosts.find((h) => h.isSpm)?.name ?? '';
      if (!spmHost) await new Promise((r) => setTimeout(r, 300));
    }
    expect(spmHost).toMatch(/^host\d$/);
    const small = await m.createDisk(sa.id, 16 * MiB, 'spm-small', {}, spm);
    const movedSmall = await m.done(
      spm.disks.moveDisk({ requestId: 'spm-move-small', storageDomainId: sa.id, diskId: small.id, targetStorageDomainId: sb.id }),
      spm,
    );
    expect(new Set(movedSmall.steps.filter((s) => s.host).map((s) => s.host))).toEqual(new Set([spmHost]));

    // Now the host death: an SPM move running on the SPM host, and SDM moves spread over all hosts.
    const spmDisk = await m.createDisk(sa.id, 128 * MiB, 'spm-big', {}, spm);
    writeRandom(spmDisk.volumes[0]!.path, 0, 96);
    const spmSum = sha256File(spmDisk.volumes[0]!.path);
    const sdmDisks = await Promise.all([1, 2, 3].map((i) => m.createDisk(a.id, 128 * MiB, `sdm-big-${i}`, {}, replica2)));
    const sdmSums = sdmDisks.map((d) => {
      writeRandom(d.volumes[0]!.path, 0, 96);
      return sha256File(d.volumes[0]!.path);
    });
    const sdmOps = await Promise.all(
      sdmDisks.map((d, i) => replica2.disks.moveDisk({ requestId: `sdm-move-big-${i}`, storageDomainId: a.id, diskId: d.id, targetStorageDomainId: b.id })),
    );
    const sdmRunning = await Promise.all(sdmOps.map((o) => running(replica2, o.name, copyRunning)));
    const spmOp = await spm.disks.moveDisk({ requestId: 'spm-move-big', storageDomainId: sa.id, diskId: spmDisk.id, targetStorageDomainId: sb.id });
    await running(spm, spmOp.name, copyRunning);
    const hostOfCopy = (op: pb.Operation) => op.steps.find((s) => s.name.startsWith('copy-volume'))!.host;
    // SDM spread the three concurrent copies over the three hosts.
    expect(new Set(sdmRunning.map(hostOfCopy)).size).toBe(3);
    const victimSdm = sdmRunning.findIndex((o) => hostOfCopy(o) === spmHost);
    expect(victimSdm).toBeGreaterThanOrEqual(0);

    const killedAt = Date.now();
    await m.killHost(spmHost);

    const [spmFinal, ...sdmFinal] = await Promise.all([m.wait(spmOp.name, spm, 175_000), ...sdmOps.map((o) => m.wait(o.name, replica2, 175_000))]);
    const recoverSeconds = (Date.now() - killedAt) / 1000;
    console.log(`host death: operations recovered ${recoverSeconds.toFixed(1)} s after kill -9 of ${spmHost}`);
    for (const op of [spmFinal!, ...sdmFinal])
      expect({ name: op.name, status: op.status, error: op.error }).toEqual({
        name: op.name,
        status: pb.OperationStatus.OPERATION_STATUS_DONE,
        error: undefined,
      });

    // The SDM copy that was on the dead host ran again on another host (attempt 2).
    const victim = sdmFinal[victimSdm]!;
    const copyStep = victim.steps.find((s) => s.name.startsWith('copy-volume'))!;
    expect(copyStep.attempt).toBeGreaterThanOrEqual(2);
    expect(copyStep.host).not.toBe(spmHost);
    // The SPM moved to another host, and the SPM move's copy finished there.
    const newSpm = (await spm.hosts.listHosts({})).hosts.find((h) => h.isSpm)?.name;
    expect(newSpm).toBeDefined();
    expect(newSpm).not.toBe(spmHost);
    const spmCopy = spmFinal!.steps.find((s) => s.name.startsWith('copy-volume'))!;
    expect(spmCopy.host).toBe(newSpm);
    expect(spmFinal!.steps.find((s) => s.name === 'delete-source')!.host).toBe(newSpm);
    expect(
      m.events.some(
        ({ event }) => event.payload?.$case === 'host' && event.payload.host.kind === pb.HostEvent_Kind.KIND_SPM_ELECTED && event.payload.host.host === newSpm,
      ),
    ).toBe(true);

    // Data intact, sources gone, nothing ILLEGAL left.
    const alive = m.mesh.hosts.find((h) => h.name !== spmHost)!;
    const mover = createClient(pb.DataMoverServiceDefinition, alive.services['data-mover']!.grpcAddress, m.mesh.credentials({ kind: 'scheduler' }));
    const check = async (api: PublicApi, src: pb.StorageDomain, dst: pb.StorageDomain, diskId: string, sum: string) => {
      const d = await api.disks.getDisk({ storageDomainId: dst.id, diskId });
      expect(d.legality).toBe(pb.Legality.LEGALITY_LEGAL);
      expect(sha256File(d.volumes[0]!.path)).toBe(sum);
      expect(await codeOf(api.disks.getDisk({ storageDomainId: src.id, diskId }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    };
    await check(spm, sa, sb, spmDisk.id, spmSum);
    for (let i = 0; i < 3; i++) await check(replica2, a, b, sdmDisks[i]!.id, sdmSums[i]!);
    const { disks } = await replica2.disks.listDisks({ storageDomainId: b.id });
    expect(disks.filter((d) => d.legality !== pb.Legality.LEGALITY_LEGAL)).toEqual([]);
    mover.close();
  }, 240_000);
});
