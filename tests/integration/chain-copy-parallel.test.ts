import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { MiB, SchedulerMesh, writeQcow2, writeRandom } from '../harness/scheduler-mesh';

/**
 * Issue 17: the volumes of one chain copy at once, each its own data-mover job on its own host,
 * on a live mesh (3 sanlock hosts, real qemu-img, files). A 3-volume chain with different data in
 * each layer is moved (and copied): the data-mover's own job records show the jobs ran on at least
 * two hosts at overlapping times, and the guest-visible content at every level of the chain is the
 * same before and after. Then a data-mover is SIGKILLed while it copies one of the volumes: that
 * copy is fenced and run again on another host, the operation still ends DONE with the content right.
 * Last, the scheduler replica running a chain's copies is SIGKILLed: another replica resumes the
 * operation from KV, re-attaches to the running jobs and ends it DONE.
 */

jest.setTimeout(300_000);

// Copies throttled (8 MiB/s each) so that they are still running when looked at or killed.
const m = new SchedulerMesh(3, { SDMESH_COPY_RATE_LIMIT: String(8 * MiB) });
let a: pb.StorageDomain;
let b: pb.StorageDomain;

beforeAll(async () => {
  await m.start();
  [a, b] = await Promise.all([m.createDomain('chain-a'), m.createDomain('chain-b')]);
}, 120_000);
afterAll(async () => {
  await m.stop();
}, 60_000);

const DONE = pb.OperationStatus.OPERATION_STATUS_DONE;
const sha = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** The guest-visible bytes at every level of a disk's chain (volume i read through its backing chain), as sha256s, base first. */
function levelSums(disk: pb.Disk, name: string): string[] {
  return disk.volumes.map((v, i) => {
    const out = path.join(m.dir, `${name}-${i}.raw`);
    execFileSync('qemu-img', ['convert', '-U', '-f', v.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? 'qcow2' : 'raw', '-O', 'raw', v.path, out]);
    const sum = sha(out);
    fs.rmSync(out);
    return sum;
  });
}

/** A disk of three volumes: random data in the base, then two snapshots, each with its own pattern over part of the one below. */
async function threeVolumeDisk(name: string, baseMiB: number, layerMiB: number): Promise<pb.Disk> {
  const disk = await m.createDisk(a.id, 64 * MiB, `create-${name}`);
  writeRandom(disk.volumes[0]!.path, 0, baseMiB);
  await m.done(m.api.disks.snapshotDisk({ requestId: `${name}-snap-1`, storageDomainId: a.id, diskId: disk.id }));
  const one = await m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id });
  writeQcow2(one.volumes[1]!.path, 4, layerMiB, 0x41);
  await m.done(m.api.disks.snapshotDisk({ requestId: `${name}-snap-2`, storageDomainId: a.id, diskId: disk.id }));
  const two = await m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id });
  writeQcow2(two.volumes[2]!.path, 8, layerMiB, 0x42);
  expect(two.volumes).toHaveLength(3);
  return two;
}

/** The data-mover's record of each copy job of an operation (asked of the host each copy step names). */
async function copyJobs(op: pb.Operation): Promise<Array<{ step: string; job: pb.Job }>> {
  const id = op.name.replace(/^operations\//, '');
  const out: Array<{ step: string; job: pb.Job }> = [];
  for (const s of op.steps.filter((x) => x.name.startsWith('copy-volume:'))) {
    const host = m.hostOf(s.host);
    const mover = createClient(pb.DataMoverServiceDefinition, host.services['data-mover']!.grpcAddress, m.mesh.credentials({ kind: 'scheduler' }));
    try {
      const job = await mover.getJob({ jobId: `${id}.${s.name.slice('copy-volume:'.length)}.${s.attempt}` });
      out.push({ step: s.name, job });
    } finally {
      mover.close();
    }
  }
  return out;
}

/** Whether two jobs on different hosts ran at overlapping times (their records' creation to their last update). */
function overlapOnTwoHosts(jobs: pb.Job[]): boolean {
  const span = (j: pb.Job) => [j.createTime!.getTime(), j.updateTime!.getTime()] as const;
  return jobs.some((x, i) => jobs.some((y, k) => k > i && x.host !== y.host && span(x)[0] < span(y)[1] && span(y)[0] < span(x)[1]));
}

/** PENDING (not yet picked up by a scheduler replica: under load, after the first look) or RUNNING. */
const ongoing = (op: pb.Operation): boolean =>
  op.status === pb.OperationStatus.OPERATION_STATUS_PENDING || op.status === pb.OperationStatus.OPERATION_STATUS_RUNNING;

test('move of a 3-volume chain: the volume copies run on different hosts at once; every level of the chain reads the same after', async () => {
  const disk = await threeVolumeDisk('move3', 16, 8);
  const before = levelSums(disk, 'move3-before');
  expect(new Set(before).size).toBe(3); // each layer changes what the guest sees
  const op = await m.done(m.api.disks.moveDisk({ requestId: 'move3', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id }));

  // Every target volume was created before any copy began, base first.
  const names = op.steps.map((s) => s.name.split(':')[0]);
  expect(names).toEqual(['inspect-source', 'create-target', 'create-target', 'create-target', 'copy-volume', 'copy-volume', 'copy-volume', 'delete-source']);
  const copies = op.steps.filter((s) => s.name.startsWith('copy-volume:'));
  const lastCreate = Math.max(...op.steps.filter((s) => s.name.startsWith('create-target:')).map((s) => s.endTime!.getTime()));
  expect(Math.min(...copies.map((s) => s.startTime!.getTime()))).toBeGreaterThanOrEqual(lastCreate);
  expect(copies.every((s) => s.status === DONE && s.attempt === 1)).toBe(true);

  // The data-mover's job records: one copy job per volume, done, on at least two hosts, overlapping in time.
  const jobs = await copyJobs(op);
  expect(jobs.map(({ job }) => [job.kind, job.status])).toEqual(Array(3).fill(['copy', pb.JobStatus.JOB_STATUS_DONE]));
  expect(new Set(jobs.map(({ job }) => job.host)).size).toBeGreaterThanOrEqual(2);
  expect(jobs.map(({ job }) => job.host)).toEqual(copies.map((s) => s.host));
  expect(overlapOnTwoHosts(jobs.map(({ job }) => job))).toBe(true);

  // The chain as it was: same ids, parents and formats, all LEGAL; the same guest data at every level.
  const moved = await m.api.disks.getDisk({ storageDomainId: b.id, diskId: disk.id });
  expect(moved.volumes.map((v) => [v.id, v.parentId, v.format, v.legality])).toEqual(
    disk.volumes.map((v) => [v.id, v.parentId, v.format, pb.Legality.LEGALITY_LEGAL]),
  );
  expect(moved.legality).toBe(pb.Legality.LEGALITY_LEGAL);
  expect(levelSums(moved, 'move3-after')).toEqual(before);
  expect(op.progress?.percent).toBe(100);
});

test('a data-mover SIGKILLed while it copies one volume of the chain: that copy is fenced and run again elsewhere; the copy ends DONE, content right', async () => {
  const disk = await threeVolumeDisk('kill3', 40, 8);
  const before = levelSums(disk, 'kill3-before');
  const started = await m.api.disks.copyDisk({ requestId: 'copy3-kill', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
  // Wait until the base's copy (the longest: 40 MiB at 8 MiB/s) moves data, its siblings placed too.
  let victim = '';
  let victimStep = '';
  for (const until = Date.now() + 90_000; !victim; await new Promise((r) => setTimeout(r, 200))) {
    const op = await m.api.ops.getOperation({ name: started.name });
    const copies = op.steps.filter((s) => s.name.startsWith('copy-volume:'));
    const base = copies[0];
    if (copies.length === 3 && base && base.status === pb.OperationStatus.OPERATION_STATUS_RUNNING && base.host && (base.progress?.percent ?? 0) > 0) {
      victim = base.host;
      victimStep = base.name;
    }
    if (!ongoing(op) || Date.now() > until) throw new Error(`the base copy was not seen running: ${JSON.stringify(pb.Operation.toJSON(op))}`);
  }
  const mover = m.hostOf(victim).services['data-mover']!;
  process.kill(mover.process.pid, 'SIGKILL');
  await mover.process.exited;

  const op = await m.wait(started.name);
  expect({ status: op.status, error: op.error }).toEqual({ status: DONE, error: undefined });
  const retried = op.steps.find((s) => s.name === victimStep)!;
  expect(retried.attempt).toBeGreaterThanOrEqual(2);
  expect(retried.host).not.toBe(victim);
  const copy = op.result?.$case === 'disk' ? op.result.disk : undefined;
  expect(copy?.volumes).toHaveLength(3);
  const target = await m.api.disks.getDisk({ storageDomainId: b.id, diskId: copy!.id });
  expect(target.volumes.every((v) => v.legality === pb.Legality.LEGALITY_LEGAL)).toBe(true);
  expect(levelSums(target, 'kill3-after')).toEqual(before);
  // The source is untouched by a copy.
  expect(levelSums(await m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id }), 'kill3-source')).toEqual(before);
  await m.restartDeadDataMovers(3);
});

test('the scheduler replica running the copies SIGKILLed: another replica resumes them from KV; DONE, content right', async () => {
  const replica2 = m.publicApi((await m.startScheduler('scheduler-2')).grpcAddress);
  try {
    const disk = await threeVolumeDisk('resume3', 24, 8);
    const before = levelSums(disk, 'resume3-before');
    const started = await m.api.disks.moveDisk({ requestId: 'move3-resume', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    for (const until = Date.now() + 90_000; ; await new Promise((r) => setTimeout(r, 200))) {
      const op = await m.api.ops.getOperation({ name: started.name });
      const copies = op.steps.filter((s) => s.name.startsWith('copy-volume:') && s.status === pb.OperationStatus.OPERATION_STATUS_RUNNING && s.host);
      if (copies.length >= 2) break;
      if (!ongoing(op) || Date.now() > until) throw new Error(`the copies were not seen running: ${JSON.stringify(pb.Operation.toJSON(op))}`);
    }
    const first = m.replicas[0]!;
    process.kill(first.process.pid, 'SIGKILL');
    await first.process.exited;
    const op = await m.wait(started.name, replica2);
    expect({ status: op.status, error: op.error }).toEqual({ status: DONE, error: undefined });
    // The base's copy (24 MiB at 8 MiB/s: running at the kill) was run again by the new owner, which
    // re-attached to the job the first replica had started instead of copying anew.
    const base = op.steps.find((s) => s.name === `copy-volume:${disk.volumes[0]!.id}`)!;
    expect(base.attempt).toBeGreaterThanOrEqual(2);
    const mover = createClient(
      pb.DataMoverServiceDefinition,
      m.hostOf(base.host).services['data-mover']!.grpcAddress,
      m.mesh.credentials({ kind: 'scheduler' }),
    );
    try {
      const jobId = `${op.name.replace(/^operations\//, '')}.${disk.volumes[0]!.id}`;
      expect((await mover.getJob({ jobId: `${jobId}.1` })).status).toBe(pb.JobStatus.JOB_STATUS_DONE);
      await expect(mover.getJob({ jobId: `${jobId}.2` })).rejects.toMatchObject({ reason: 'JOB_NOT_FOUND' });
    } finally {
      mover.close();
    }
    const moved = await replica2.disks.getDisk({ storageDomainId: b.id, diskId: disk.id });
    expect(moved.volumes.every((v) => v.legality === pb.Legality.LEGALITY_LEGAL)).toBe(true);
    expect(levelSums(moved, 'resume3-after')).toEqual(before);
  } finally {
    replica2.close();
  }
});
