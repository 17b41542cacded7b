import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { GrpcStatus, leaseOffset, pb, SdmeshError } from '@sdmesh/common';
import { decodeVolumeRecord, encodeVolumeRecord } from '@sdmesh/common/internal';
import { waitFor } from '@sdmesh/localmesh';
import {
  allocatedBytes,
  DataMoverMesh,
  descriptorFlags,
  GiB,
  MiB,
  O_DIRECT,
  processesMentioning,
  recordFile,
  volumeFile,
  writeRandom,
} from '../harness/data-mover-mesh';

/**
 * The data-mover against real parts: 2 simulated hosts (real sanlock daemons at io_timeout 1,
 * lease-managers, metadata-tx, data-movers as separate processes), real qemu-img, real files.
 * Each data-mover runs one job at a time (--max-concurrent-jobs 1) so the queue is exercised.
 */
/**
 * qemu-img as the data-movers run it: exec'd, except for a convert started while the marker file
 * exists, which runs as a child of this script with its output dropped, so it outlives a killed worker.
 */
const standInDir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-qemu-img-'));
const orphanMarker = path.join(standInDir, 'next-convert-outlives-worker');
const qemuImgStandIn = path.join(standInDir, 'qemu-img');
fs.writeFileSync(
  qemuImgStandIn,
  `#!/bin/sh\nif [ "$1" = convert ] && [ -e ${orphanMarker} ]; then rm -f ${orphanMarker}; qemu-img "$@" >/dev/null 2>&1; exit $?; fi\nexec qemu-img "$@"\n`,
  { mode: 0o755 },
);

/** The parent of a process (from /proc/<pid>/stat). */
const parentPid = (pid: number): number | undefined => {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) || undefined;
};

describe('data-mover on 2 hosts', () => {
  const mesh = new DataMoverMesh(2, { SDMESH_MAX_CONCURRENT_JOBS: '1', SDMESH_QEMU_IMG: qemuImgStandIn });
  let domainA: { id: string; path: string };
  let domainB: { id: string; path: string };
  let source: Awaited<ReturnType<DataMoverMesh['createVolume']>>;
  let sourceSha = '';

  const expectError = async (p: Promise<unknown>, code: GrpcStatus, reason: string): Promise<SdmeshError> => {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SdmeshError);
    const e = err as SdmeshError;
    expect({ code: GrpcStatus[e.code], reason: e.reason }).toEqual({ code: GrpcStatus[code], reason });
    return e;
  };

  /** Starts a throttled copy and waits until qemu-img is really copying. */
  const startSlowCopy = async (hostId: number, destination: pb.VolumeRef, rate = 8 * MiB) => {
    const jobId = randomUUID();
    await mesh
      .host(hostId)
      .mover.copyVolume({ jobId, source: source.ref, destination, destinationGeneration: 0, collapse: true, rateLimitBytesPerSecond: rate });
    await waitFor(
      `job ${jobId} copying`,
      async () => {
        const j = await mesh.host(hostId).mover.getJob({ jobId });
        if (j.status === pb.JobStatus.JOB_STATUS_FAILED) throw new Error(`job failed: ${j.error?.message}`);
        return j.phase === 'copying' && j.progress!.percent > 1 ? j : undefined;
      },
      60000,
      100,
    );
    return jobId;
  };

  beforeAll(async () => {
    await mesh.start();
    domainA = await mesh.formatDomain('domain-a');
    domainB = await mesh.formatDomain('domain-b');
    // 1 GiB sparse raw holding 256 MiB of random data in 4 runs (written as a guest would).
    source = await mesh.createVolume(domainA, { format: 'RAW', capacity: GiB });
    for (const at of [0, 300, 600, 960]) writeRandom(volumeFile(source.ref), at, 64);
    sourceSha = execFileSync('sha256sum', [volumeFile(source.ref)], { encoding: 'utf8' }).split(' ')[0]!;
  });
  afterAll(async () => {
    await mesh.stop();
    fs.rmSync(standInDir, { recursive: true, force: true });
  });

  it('copies 1 GiB sparse raw to raw and to qcow2 in another domain: equal checksums, ~256 MiB allocated, LEGAL at generation 1', async () => {
    const toRaw = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const toQcow2 = await mesh.createVolume(domainB, { format: 'QCOW2', capacity: GiB, illegal: true });
    const rawJob = randomUUID();
    const qcowJob = randomUUID();
    const started = Date.now();
    const [a, b] = await Promise.all([
      mesh.host(1).mover.copyVolume({ jobId: rawJob, source: source.ref, destination: toRaw.ref, destinationGeneration: 0, collapse: true, verify: true }),
      mesh.host(2).mover.copyVolume({ jobId: qcowJob, source: source.ref, destination: toQcow2.ref, destinationGeneration: 0, collapse: true }),
    ]);
    // Watched from the start: a copy may be past its 'copying' phase by the time the checks below are done.
    const watching = Promise.all([mesh.watchJob(1, rawJob), mesh.watchJob(2, qcowJob)]);
    watching.catch(() => undefined); // awaited below; a failure meanwhile is not unhandled
    expect(a.id).toBe(rawJob);
    expect([pb.JobStatus.JOB_STATUS_QUEUED, pb.JobStatus.JOB_STATUS_RUNNING]).toContain(b.status);
    // Idempotent on job id: the same request returns the same job; another request with that id is refused.
    expect(
      (
        await mesh
          .host(1)
          .mover.copyVolume({ jobId: rawJob, source: source.ref, destination: toRaw.ref, destinationGeneration: 0, collapse: true, verify: true })
      ).id,
    ).toBe(rawJob);
    await expectError(
      mesh.host(1).mover.copyVolume({ jobId: rawJob, source: source.ref, destination: toQcow2.ref, destinationGeneration: 0 }),
      GrpcStatus.ALREADY_EXISTS,
      'JOB_ID_CONFLICT',
    );

    const [rawStates, qcowStates] = await watching;
    const seconds = (Date.now() - started) / 1000;
    const rawDone = rawStates.at(-1)!;
    const qcowDone = qcowStates.at(-1)!;
    expect([pb.JobStatus[rawDone.status], rawDone.error?.message]).toEqual(['JOB_STATUS_DONE', undefined]);
    expect([pb.JobStatus[qcowDone.status], qcowDone.error?.message]).toEqual(['JOB_STATUS_DONE', undefined]);
    expect(rawDone.resultGeneration).toBe(1);
    expect(rawDone.verified).toBe(true);
    expect(rawDone.progress!.percent).toBe(100);
    expect(rawDone.progress!.bytesDone).toBe(GiB);
    expect(rawStates.map((j) => j.phase)).toEqual(expect.arrayContaining(['copying', 'verifying', 'committing']));

    for (const v of [toRaw, toQcow2]) {
      const vol = await mesh.getVolume(v.ref);
      expect({ legality: pb.Legality[vol.legality], generation: vol.generation }).toEqual({ legality: 'LEGALITY_LEGAL', generation: 1 });
    }
    const sums = await Promise.all([
      mesh.host(1).mover.checksumVolume({ volume: source.ref }),
      mesh.host(1).mover.checksumVolume({ volume: toRaw.ref }),
      mesh.host(2).mover.checksumVolume({ volume: toQcow2.ref }),
    ]);
    expect(sums.map((s) => s.checksum)).toEqual([sourceSha, sourceSha, sourceSha]);
    expect(sums.every((s) => s.algorithm === 'sha256' && s.bytes === GiB)).toBe(true);
    const allocated = [allocatedBytes(volumeFile(toRaw.ref)), allocatedBytes(volumeFile(toQcow2.ref))];
    for (const bytes of allocated) {
      expect(bytes).toBeGreaterThanOrEqual(256 * MiB);
      expect(bytes).toBeLessThan(300 * MiB);
    }
    // Compare with qemu-img itself, independently of the service.
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', volumeFile(source.ref), volumeFile(toQcow2.ref)]);

    const kinds = mesh.jobEvents(rawJob).map((e) => pb.JobEvent_Kind[e.kind]);
    expect(kinds[0]).toBe('KIND_STARTED');
    expect(kinds.at(-1)).toBe('KIND_FINISHED');
    // Each job took its source (shared) and destination (exclusive) leases in one AcquireLeases
    // call of its host's lease-manager (one sanlock acquire), not one AcquireLease per lease.
    for (const [hostId, jobId, destination] of [
      [1, rawJob, toRaw],
      [2, qcowJob, toQcow2],
    ] as const) {
      const leaseCalls = mesh.service(hostId, 'lease-manager').lines.flatMap((line) => {
        if (!line.startsWith('{') || !line.includes('"audit"')) return [];
        const audited = (JSON.parse(line) as { audit?: { method: string; target: { operationId?: string }; outcome: string; reason?: string } }).audit;
        return audited?.target.operationId === jobId ? [[audited.method.split('/').pop(), audited.outcome, audited.reason].filter(Boolean).join(' ')] : [];
      });
      // Before it, a refusal for a lockspace the host had not joined yet may come (nothing taken; the worker joins and asks again).
      expect(leaseCalls.filter((c) => c !== 'AcquireLeases FAILED_PRECONDITION LOCKSPACE_NOT_JOINED')).toEqual(['AcquireLeases OK']);
      const granted = mesh.events.flatMap((e) =>
        e.payload?.$case === 'lease' && e.payload.lease.operationId === jobId && e.payload.lease.kind === pb.LeaseEvent_Kind.KIND_ACQUIRED
          ? [[e.payload.lease.hostId, e.payload.lease.lease?.resource, pb.LeaseMode[e.payload.lease.mode]]]
          : [],
      );
      expect(granted).toEqual([
        [hostId, source.ref.volumeId, 'LEASE_MODE_SHARED'],
        [hostId, destination.ref.volumeId, 'LEASE_MODE_EXCLUSIVE'],
      ]);
    }
    const metrics = await mesh.metrics(1);
    const copied = Number(/^sdmesh_data_mover_bytes_copied_total\S* (\d+)/m.exec(metrics)?.[1]);
    expect(copied).toBeGreaterThanOrEqual(250 * MiB);
    expect(copied).toBeLessThanOrEqual(260 * MiB);
    expect(metrics).toMatch(/sdmesh_data_mover_copy_duration_seconds_count\{[^}]*result="done"\} 1/);
    const load = await mesh.host(1).mover.getHostLoad({});
    expect(load).toMatchObject({ runningJobs: 0, queuedJobs: 0, maxConcurrentJobs: 1 });
    console.log(
      `copy 1 GiB (256 MiB data) raw→raw ‖ raw→qcow2 on 2 hosts: ${seconds.toFixed(1)} s incl. lockspace joins; ` +
        `allocated ${allocated.map((x) => (x / MiB).toFixed(1)).join(' / ')} MiB; host1 recent ${load.recentMbps} MB/s`,
    );
  });

  it('refuses bad inputs with clear codes and writes nothing', async () => {
    const dest = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const small = await mesh.createVolume(domainB, { format: 'RAW', capacity: 512 * MiB, illegal: true });
    const illegalSource = await mesh.createVolume(domainA, { format: 'RAW', capacity: 64 * MiB, illegal: true });
    const before = fs.readFileSync(recordFile(dest.ref));
    const mtime = fs.statSync(volumeFile(dest.ref)).mtimeMs;
    const jobsBefore = (await mesh.host(1).mover.listJobs({})).jobs.length;
    const mover = mesh.host(1).mover;
    const copy = (over: Partial<pb.CopyVolumeRequest>) =>
      mover.copyVolume({ jobId: randomUUID(), source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true, ...over });

    await expectError(copy({ source: { ...source.ref, volumeId: randomUUID() } }), GrpcStatus.NOT_FOUND, 'VOLUME_NOT_FOUND');
    await expectError(copy({ destination: { ...dest.ref, domainPath: domainB.path + '-missing' } }), GrpcStatus.NOT_FOUND, 'DOMAIN_NOT_FOUND');
    const tooSmall = await expectError(copy({ destination: small.ref }), GrpcStatus.FAILED_PRECONDITION, 'DESTINATION_TOO_SMALL');
    expect(tooSmall.message).toMatch(/smaller than source/);
    await expectError(copy({ source: illegalSource.ref }), GrpcStatus.FAILED_PRECONDITION, 'SOURCE_ILLEGAL');
    await expectError(copy({ destination: source.ref }), GrpcStatus.INVALID_ARGUMENT, 'SAME_VOLUME');
    await expectError(copy({ destinationGeneration: 7 }), GrpcStatus.FAILED_PRECONDITION, 'GENERATION_MISMATCH');
    await expectError(copy({ destination: { ...dest.ref, volumeId: '../../etc' } }), GrpcStatus.INVALID_ARGUMENT, 'INVALID_ID');
    await expectError(copy({ source: { ...source.ref, domainPath: 'relative/path' } }), GrpcStatus.INVALID_ARGUMENT, 'INVALID_PATH');
    await expectError(copy({ jobId: 'no spaces allowed' }), GrpcStatus.INVALID_ARGUMENT, 'INVALID_JOB_ID');
    await expectError(mover.getJob({ jobId: randomUUID() }), GrpcStatus.NOT_FOUND, 'JOB_NOT_FOUND');
    await expectError(mover.checksumVolume({ volume: illegalSource.ref }), GrpcStatus.FAILED_PRECONDITION, 'VOLUME_ILLEGAL');

    expect(fs.readFileSync(recordFile(dest.ref))).toEqual(before);
    expect(fs.statSync(volumeFile(dest.ref)).mtimeMs).toBe(mtime);
    expect((await mover.listJobs({})).jobs.length).toBe(jobsBefore);
  });

  it('abort mid-copy: the writer writes O_DIRECT; the destination stays ILLEGAL, no lease is held, no child is left', async () => {
    const dest = await mesh.createVolume(domainB, { format: 'QCOW2', capacity: GiB, illegal: true });
    const jobId = await startSlowCopy(1, dest.ref);
    const children = processesMentioning(dest.ref.volumeId!);
    const writer = children.find((p) => p.cmdline.includes('qemu-img convert'));
    expect(writer).toBeDefined();
    // No write outlives its lease: every descriptor the writer holds on the destination is
    // O_DIRECT (the one we passed and the one qemu-img opened itself), none goes through the page cache.
    const destinationFlags = descriptorFlags(writer!.pid, volumeFile(dest.ref));
    expect(destinationFlags.length).toBeGreaterThanOrEqual(2);
    expect(destinationFlags.map((flags) => ({ direct: (flags & O_DIRECT) !== 0, writable: (flags & 3) !== 0 }))).toEqual(
      destinationFlags.map(() => ({ direct: true, writable: true })),
    );
    const held = await mesh.host(1).leases.listHeldLeases({});
    expect(held.leases.map((l) => `${l.location!.resource}:${pb.LeaseMode[l.mode]}`).sort()).toEqual(
      [`${source.ref.volumeId}:LEASE_MODE_SHARED`, `${dest.ref.volumeId}:LEASE_MODE_EXCLUSIVE`].sort(),
    );

    const aborted = await mesh.host(1).mover.abortJob({ jobId }, { timeoutMs: 30000 });
    expect(pb.JobStatus[aborted.status]).toBe('JOB_STATUS_ABORTED');
    expect(aborted.error).toMatchObject({ code: GrpcStatus.ABORTED, reason: 'ABORTED' });
    expect(aborted.destinationMarkedIllegal).toBe(true);
    expect(aborted.progress!.percent).toBeLessThan(100);
    const vol = await mesh.getVolume(dest.ref);
    expect({ legality: pb.Legality[vol.legality], generation: vol.generation }).toEqual({ legality: 'LEGALITY_ILLEGAL', generation: 0 });
    expect(processesMentioning(dest.ref.volumeId!)).toEqual([]);
    await waitFor('no held leases on host 1', async () => ((await mesh.host(1).leases.listHeldLeases({})).leases.length === 0 ? true : undefined), 60_000);
    const owner = await mesh.host(2).leases.getLeaseOwner({ lease: held.leases.find((l) => l.location!.resource === dest.ref.volumeId)!.location });
    expect(owner.ownerHostIds).toEqual([]);
    expect(mesh.jobEvents(jobId).map((e) => pb.JobEvent_Kind[e.kind])).toContain('KIND_ABORTED');
    // Aborting again is a no-op that returns the ended job.
    expect(pb.JobStatus[(await mesh.host(1).mover.abortJob({ jobId })).status]).toBe('JOB_STATUS_ABORTED');
  });

  it('a queued job whose destination generation was bumped meanwhile fails and changes nothing', async () => {
    const busy = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const dest = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const first = await startSlowCopy(2, busy.ref);
    const staleJob = randomUUID();
    const queued = await mesh
      .host(2)
      .mover.copyVolume({ jobId: staleJob, source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true });
    expect(pb.JobStatus[queued.status]).toBe('JOB_STATUS_QUEUED');
    expect(await mesh.host(2).mover.getHostLoad({})).toMatchObject({ runningJobs: 1, queuedJobs: 1 });
    // Someone fences the destination (as the scheduler does for a job it lost track of).
    await mesh.host(1).metadata.updateVolume({ ...dest.ref, generation: 0, bumpGeneration: true, operationId: 'fence' });
    const recordBefore = fs.readFileSync(recordFile(dest.ref));
    await mesh.host(2).mover.abortJob({ jobId: first });
    const states = await mesh.watchJob(2, staleJob);
    const end = states.at(-1)!;
    expect(pb.JobStatus[end.status]).toBe('JOB_STATUS_FAILED');
    expect(end.error).toMatchObject({ code: GrpcStatus.FAILED_PRECONDITION, reason: 'GENERATION_MISMATCH' });
    expect(end.error!.message).toMatch(/generation 1, the request expected 0/);
    expect(end.destinationMarkedIllegal).toBe(false);
    expect(fs.readFileSync(recordFile(dest.ref))).toEqual(recordBefore);
    expect(allocatedBytes(volumeFile(dest.ref))).toBe(0);
    expect(await mesh.metrics(2)).toMatch(/sdmesh_data_mover_job_failures_total\{reason="GENERATION_MISMATCH"[^}]*\} 1/);
  });

  it('a queued job whose destination lease moved meanwhile copies under the lease its record names now, not the one the service found', async () => {
    const busy = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const dest = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const first = await startSlowCopy(2, busy.ref);
    const jobId = randomUUID();
    const queued = await mesh.host(2).mover.copyVolume({ jobId, source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true });
    expect(pb.JobStatus[queued.status]).toBe('JOB_STATUS_QUEUED');
    // The record now names another slot, formatted for this volume; the slot the service saw stays a
    // valid lease of the same name (as a stale area would): holding it protects nothing.
    const leasesPath = path.join(domainB.path, 'dom_md', 'leases');
    const record = decodeVolumeRecord(fs.readFileSync(recordFile(dest.ref)), 'destination');
    const movedSlot = record.leaseSlot + 200;
    const moved = { lockspace: domainB.id, resource: dest.ref.volumeId, path: leasesPath, offset: leaseOffset(movedSlot) };
    await mesh.host(2).leases.formatLeases({ lockspace: domainB.id, path: leasesPath, leases: [moved] });
    const tmp = `${recordFile(dest.ref)}.test-tmp`;
    fs.writeFileSync(tmp, encodeVolumeRecord({ ...record, leaseSlot: movedSlot }));
    fs.renameSync(tmp, recordFile(dest.ref));
    const stale = { ...moved, offset: dest.lease!.offset };
    const staleLver = (await mesh.host(2).leases.getLeaseOwner({ lease: stale })).lver;

    await mesh.host(2).mover.abortJob({ jobId: first });
    const end = (await mesh.watchJob(2, jobId)).at(-1)!;
    expect([pb.JobStatus[end.status], end.error?.message]).toEqual(['JOB_STATUS_DONE', undefined]);
    expect(end.resultGeneration).toBe(1);
    expect((await mesh.host(2).mover.checksumVolume({ volume: dest.ref })).checksum).toBe(sourceSha);
    // Both slots were acquired exclusively (sanlock counts each exclusive acquire in the lease's
    // lver): the stale one first, where the service had found it, then the one the record names.
    expect((await mesh.host(2).leases.getLeaseOwner({ lease: stale })).lver).toBeGreaterThan(staleLver);
    expect((await mesh.host(2).leases.getLeaseOwner({ lease: moved })).lver).toBeGreaterThan(0);
    const vol = await mesh.getVolume(dest.ref);
    expect({ legality: pb.Legality[vol.legality], generation: vol.generation }).toEqual({ legality: 'LEGALITY_LEGAL', generation: 1 });
  });

  it('a second copy to the same destination is refused naming the holder; kill -9 of the data-mover frees the lease, the destination stays ILLEGAL, a retry succeeds', async () => {
    const dest = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const jobId = await startSlowCopy(1, dest.ref);

    // Same host: refused at once, naming the job. Other host: the worker cannot get the lease, named by host id.
    const sameHost = await expectError(
      mesh.host(1).mover.copyVolume({ jobId: randomUUID(), source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true }),
      GrpcStatus.ABORTED,
      'DESTINATION_BUSY',
    );
    expect(sameHost.message).toContain(jobId);
    const rival = randomUUID();
    await mesh.host(2).mover.copyVolume({ jobId: rival, source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true });
    const rivalEnd = (await mesh.watchJob(2, rival)).at(-1)!;
    expect(pb.JobStatus[rivalEnd.status]).toBe('JOB_STATUS_FAILED');
    expect(rivalEnd.error).toMatchObject({ code: GrpcStatus.ABORTED, reason: 'LEASE_HELD' });
    expect(rivalEnd.error!.message).toMatch(/held \(exclusive\) by host id 1/);

    // kill -9 the data-mover of host 1: its worker and qemu-img die with it (pdeathsig).
    const moverProcess = mesh.service(1, 'data-mover').process;
    const workers = processesMentioning(dest.ref.volumeId!);
    expect(workers.length).toBeGreaterThan(0);
    process.kill(moverProcess.pid, 'SIGKILL');
    await moverProcess.exited;
    await waitFor('worker and qemu-img gone', () => (processesMentioning(dest.ref.volumeId!).length === 0 ? true : undefined), 60_000);
    const location = { lockspace: domainB.id, resource: dest.ref.volumeId, path: `${domainB.path}/dom_md/leases`, offset: dest.lease!.offset };
    await waitFor(
      'lease free',
      async () => ((await mesh.host(2).leases.getLeaseOwner({ lease: location })).ownerHostIds.length === 0 ? true : undefined),
      60_000,
    );
    const vol = await mesh.getVolume(dest.ref);
    expect({ legality: pb.Legality[vol.legality], generation: vol.generation }).toEqual({ legality: 'LEGALITY_ILLEGAL', generation: 0 });

    // The retry (same job id, on the other host) succeeds.
    await mesh.host(2).mover.copyVolume({ jobId, source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true });
    const end = (await mesh.watchJob(2, jobId)).at(-1)!;
    expect([pb.JobStatus[end.status], end.error?.message]).toEqual(['JOB_STATUS_DONE', undefined]);
    expect(end.resultGeneration).toBe(1);
    expect((await mesh.host(2).mover.checksumVolume({ volume: dest.ref })).checksum).toBe(sourceSha);
  });

  it('the writer holds the leases too: a worker SIGKILLed under a qemu-img that outlives it leaves the lease held until that writer is gone', async () => {
    // The stand-in runs the next convert as its child with the output dropped, so the real qemu-img
    // survives the worker (pdeathsig reaches only the stand-in), as a writer finishing a write would.
    const dest = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    fs.writeFileSync(orphanMarker, '');
    const jobId = randomUUID();
    await mesh
      .host(2)
      .mover.copyVolume({ jobId, source: source.ref, destination: dest.ref, destinationGeneration: 0, collapse: true, rateLimitBytesPerSecond: 8 * MiB });
    const writer = await waitFor(
      'qemu-img convert running',
      () => processesMentioning(dest.ref.volumeId!).find((p) => p.cmdline.startsWith('qemu-img convert')),
      30000,
      50,
    );
    const worker = parentPid(parentPid(writer.pid)!)!;
    expect(fs.readFileSync(`/proc/${worker}/cmdline`, 'utf8')).toContain('copy-worker');
    const location = { lockspace: domainB.id, resource: dest.ref.volumeId, path: `${domainB.path}/dom_md/leases`, offset: dest.lease!.offset };
    const owners = async () => (await mesh.host(1).leases.getLeaseOwner({ lease: location })).ownerHostIds;
    expect(await owners()).toEqual([2]);

    process.kill(worker, 'SIGKILL');
    await waitFor('worker gone', () => (fs.existsSync(`/proc/${worker}`) ? undefined : true), 60_000, 20);
    // The writer still runs: sanlock has not freed the lease (before, it did the moment the worker died).
    for (let i = 0; i < 10; i++) {
      expect(fs.existsSync(`/proc/${writer.pid}`)).toBe(true);
      expect(await owners()).toEqual([2]);
      await new Promise((r) => setTimeout(r, 200));
    }
    process.kill(writer.pid, 'SIGKILL');
    await waitFor('lease free once the writer is gone', async () => ((await owners()).length === 0 ? true : undefined), 60_000, 50);
    expect(processesMentioning(dest.ref.volumeId!)).toEqual([]); // (a zombie awaiting its new parent holds no file)
    const end = (await mesh.watchJob(2, jobId)).at(-1)!;
    expect(pb.JobStatus[end.status]).toBe('JOB_STATUS_FAILED');
  });

  it('copies a snapshot chain: flattened into one raw volume, or keeping the chain (only the top layer copied)', async () => {
    // Runs last: it gives the shared source a child (and host 1's data-mover was killed above). The guest writes 16 MiB into the snapshot.
    const top = await mesh.createSnapshot(source.ref);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 100M 16M', volumeFile(top.ref)], { stdio: 'ignore' });
    const topSum = (await mesh.host(2).mover.checksumVolume({ volume: top.ref })).checksum;
    expect(topSum).not.toBe(sourceSha);
    const run = async (hostId: number, src: pb.VolumeRef, dst: pb.VolumeRef, collapse: boolean) => {
      const jobId = randomUUID();
      await mesh.host(hostId).mover.copyVolume({ jobId, source: src, destination: dst, destinationGeneration: 0, collapse, verify: true });
      return (await mesh.watchJob(hostId, jobId)).at(-1)!;
    };

    // Flattened: base + top → one raw volume.
    const flat = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    const flatEnd = await run(2, top.ref, flat.ref, true);
    expect([pb.JobStatus[flatEnd.status], flatEnd.error?.message, flatEnd.verified]).toEqual(['JOB_STATUS_DONE', undefined, true]);
    expect((await mesh.host(2).mover.checksumVolume({ volume: flat.ref })).checksum).toBe(topSum);

    // Chain kept: copy the base, snapshot the copy, copy only the top layer onto that snapshot.
    const destBase = await mesh.createVolume(domainB, { format: 'RAW', capacity: GiB, illegal: true });
    expect(pb.JobStatus[(await run(2, source.ref, destBase.ref, true)).status]).toBe('JOB_STATUS_DONE');
    const destTop = await mesh.createSnapshot(destBase.ref, true);
    await expectError(
      mesh.host(2).mover.copyVolume({ jobId: randomUUID(), source: top.ref, destination: flat.ref, destinationGeneration: 1, collapse: false }),
      GrpcStatus.FAILED_PRECONDITION,
      'DESTINATION_CHAIN_MISMATCH',
    );
    await expectError(
      mesh.host(2).mover.copyVolume({ jobId: randomUUID(), source: top.ref, destination: destBase.ref, destinationGeneration: 1, collapse: true }),
      GrpcStatus.FAILED_PRECONDITION,
      'DESTINATION_HAS_CHILDREN',
    );
    const keptEnd = await run(2, top.ref, destTop.ref, false);
    expect([pb.JobStatus[keptEnd.status], keptEnd.error?.message, keptEnd.verified]).toEqual(['JOB_STATUS_DONE', undefined, true]);
    expect((await mesh.host(2).mover.checksumVolume({ volume: destTop.ref })).checksum).toBe(topSum);
    const topAllocated = allocatedBytes(volumeFile(destTop.ref));
    expect(topAllocated).toBeGreaterThanOrEqual(16 * MiB);
    expect(topAllocated).toBeLessThan(20 * MiB);
  });
});
