import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { createClient, pb } from '@sdmesh/common';
import { REPO_ROOT } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh, writeQcow2, writeRandom } from '../harness/scheduler-mesh';

const run = promisify(execFile);
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const CAPACITY = 96 * MiB;

/**
 * DeleteSnapshot (a cold merge) on a real mesh: 2 hosts with their own sanlock daemons, nats,
 * qemu-img and files. Chains of three volumes with distinct data in every layer (a raw base, two
 * qcow2 snapshots); the guest views are compared by the data-mover's ChecksumVolume before and
 * after. The merged-away volume is left to the GC; `sdmctl check` must be clean. Merges are
 * throttled (16 MiB/s) so the kills land while qemu-img runs.
 */
describe('delete snapshot (merge)', () => {
  const m = new SchedulerMesh(2, { SDMESH_COPY_RATE_LIMIT: String(16 * MiB) }, { SDMESH_GRACE_MS: '0' });
  let dom: pb.StorageDomain;
  let sdmctlEnv: NodeJS.ProcessEnv;
  /** Hosts whose services were killed (not asked for checksums or GC passes any more). */
  const deadHosts = new Set<number>();
  const liveHost = () => (deadHosts.has(1) ? 2 : 1);

  const scheduler = () => m.mesh.credentials({ kind: 'scheduler' });
  const hostClient = <D extends Parameters<typeof createClient>[0]>(def: D, host: number, svc: 'metadata-tx' | 'data-mover' | 'gc') =>
    createClient(def, m.mesh.hosts[host - 1]!.services[svc]!.grpcAddress, scheduler());
  const sdmctl = (...args: string[]) => run(process.execPath, [SDMCTL, ...args], { env: sdmctlEnv, timeout: 120_000 });

  /** sha256 of a volume's guest-visible content (its chain read from the records by the data-mover). */
  const checksum = async (diskId: string, volumeId: string): Promise<string> => {
    const mover = hostClient(pb.DataMoverServiceDefinition, liveHost(), 'data-mover');
    try {
      return (await mover.checksumVolume({ volume: { domainPath: dom.path, imageId: diskId, volumeId } }, { timeoutMs: 60_000 })).checksum;
    } finally {
      mover.close();
    }
  };
  const disk = (diskId: string) => m.api.disks.getDisk({ storageDomainId: dom.id, diskId });
  const deleteSnapshot = (requestId: string, diskId: string, volumeId: string) =>
    m.api.disks.deleteSnapshot({ requestId, storageDomainId: dom.id, diskId, volumeId });

  /** base (raw) ← mid ← leaf, each layer with its own data (mid overlaps the base's, the leaf overlaps mid's). */
  const chain3 = async (name: string, midMiB = 8): Promise<{ id: string; base: pb.Volume; mid: pb.Volume; leaf: pb.Volume }> => {
    const created = await m.createDisk(dom.id, CAPACITY, `create-${name}`);
    writeRandom(created.volumes[0]!.path, 0, 12);
    await m.done(m.api.disks.snapshotDisk({ requestId: `snap1-${name}`, storageDomainId: dom.id, diskId: created.id, description: 'first' }));
    writeQcow2((await disk(created.id)).volumes[1]!.path, 8, midMiB, 0x33);
    await m.done(m.api.disks.snapshotDisk({ requestId: `snap2-${name}`, storageDomainId: dom.id, diskId: created.id, description: 'second' }));
    const [base, mid, leaf] = (await disk(created.id)).volumes;
    writeQcow2(leaf!.path, 4, 6, 0x44);
    return { id: created.id, base: base!, mid: mid!, leaf: leaf! };
  };
  const sums = async (diskId: string, vols: pb.Volume[]) => Promise.all(vols.map((v) => checksum(diskId, v.id)));
  const backingOf = (file: string): string => {
    const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file], { encoding: 'utf8' })) as {
      'backing-filename'?: string;
    };
    return info['backing-filename'] ?? '';
  };
  const bitmapsOf = (file: string) => {
    const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file], { encoding: 'utf8' })) as {
      'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } };
    };
    return (info['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags }));
  };
  const collectUntilClean = () => m.collectUntilClean(dom.path, liveHost());
  const check = async () => JSON.parse((await sdmctl('check', dom.path, '-o', 'json')).stdout) as { ok: boolean; violations: unknown[] };
  const imageFiles = (diskId: string) => fs.readdirSync(path.join(dom.path, 'images', diskId)).sort();

  beforeAll(async () => {
    await m.start();
    dom = await m.createDomain('merge');
    sdmctlEnv = {
      PATH: process.env.PATH,
      SDMESH_ADDRESS: m.replicas[0]!.grpcAddress,
      ...m.mesh.nats.clientEnv('sdmctl'),
      ...m.mesh.tlsEnv({ kind: 'user', name: 'admin' }),
      SDMCTL_OUTPUT: '',
    };
  }, 180_000);
  afterAll(() => m.stop(), 60_000);

  test("deleting the leaf's parent: committed into the base, the leaf re-parented; every remaining view unchanged; the GC removes the merged-away volume", async () => {
    const c = await chain3('internal');
    const [baseSum, midSum, leafSum] = await sums(c.id, [c.base, c.mid, c.leaf]);
    expect(new Set([baseSum, midSum, leafSum]).size).toBe(3);

    const first = await deleteSnapshot('del-internal', c.id, c.mid.id);
    // The same request again: the same operation; another operation on the disk meanwhile: LOCKED.
    expect((await deleteSnapshot('del-internal', c.id, c.mid.id)).name).toBe(first.name);
    expect(await codeOf(m.api.disks.snapshotDisk({ requestId: 'snap-while-merging', storageDomainId: dom.id, diskId: c.id }))).toEqual(['ABORTED', 'LOCKED']);
    const op = await m.wait(first.name);
    expect({ status: op.status, error: op.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    expect(op.steps.map((s) => s.name)).toEqual(['inspect-chain', `merge-volume:${c.mid.id}`, 'finalize-merge']);
    expect(op.progress?.percent).toBe(100);

    const after = await disk(c.id);
    expect(after.volumes.map((v) => [v.id, v.parentId])).toEqual([
      [c.base.id, ''],
      [c.leaf.id, c.base.id],
    ]);
    expect(after.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(after.volumes[0]!.generation).toBe(c.base.generation + 1);
    // The leaf sees what it saw; the base now holds what the merged-away volume showed.
    expect(await checksum(c.id, c.leaf.id)).toBe(leafSum);
    expect(await checksum(c.id, c.base.id)).toBe(midSum);
    expect(backingOf(c.leaf.path)).toBe(c.base.id);
    // Events: the merged-away volume deleted, the leaf updated, by this operation.
    const opId = first.name.split('/')[1];
    const volumeEvents = m.events.flatMap(({ event }) =>
      event.payload?.$case === 'volume' && event.payload.volume.operationId === opId ? [event.payload.volume] : [],
    );
    expect(volumeEvents.some((e) => e.kind === pb.VolumeEvent_Kind.KIND_DELETED && e.volume?.id === c.mid.id)).toBe(true);
    expect(volumeEvents.some((e) => e.kind === pb.VolumeEvent_Kind.KIND_UPDATED && e.volume?.id === c.leaf.id && e.volume.parentId === c.base.id)).toBe(true);

    // The merged-away volume is garbage now, and the GC takes it.
    expect(imageFiles(c.id).filter((f) => f.startsWith(`_deleted_${c.mid.id}`))).toHaveLength(2);
    expect(await collectUntilClean()).toBeGreaterThanOrEqual(1);
    expect(imageFiles(c.id)).toEqual([c.base.id, `${c.base.id}.meta`, c.leaf.id, `${c.leaf.id}.meta`].sort());
    expect(await check()).toMatchObject({ ok: true, violations: [] });
    expect(await checksum(c.id, c.leaf.id)).toBe(leafSum);
  });

  test('deleting the base: it is merged into its child (rebase), which becomes the base; deleting the leaf of an extended disk (sdmctl): its parent grown, the data committed, its dirty bitmap merged there', async () => {
    const c = await chain3('base');
    const [midSum, leafSum] = await sums(c.id, [c.mid, c.leaf]);

    await m.done(deleteSnapshot('del-base', c.id, c.base.id));
    let after = await disk(c.id);
    expect(after.volumes.map((v) => [v.id, v.parentId])).toEqual([
      [c.mid.id, ''],
      [c.leaf.id, c.mid.id],
    ]);
    expect(after.volumes[0]!.format).toBe(pb.VolumeFormat.VOLUME_FORMAT_QCOW2);
    expect(await sums(c.id, [c.mid, c.leaf])).toEqual([midSum, leafSum]);
    expect(backingOf(c.mid.path)).toBe('');

    // The disk extended: its leaf grows, its parent keeps its size; data beyond the old end.
    const grown = CAPACITY + 32 * MiB;
    await m.done(m.api.disks.extendDisk({ requestId: 'extend-base-chain', storageDomainId: dom.id, diskId: c.id, capacityBytes: grown }));
    expect((await disk(c.id)).volumes.map((v) => v.capacityBytes)).toEqual([CAPACITY, grown]);
    writeQcow2(c.leaf.path, CAPACITY / MiB + 8, 4, 0x66);
    // The latest snapshot (the leaf) through sdmctl: its parent grows to the leaf's size, takes its
    // data and becomes the leaf. A dirty bitmap of the leaf (a backup tracking its writes) is carried
    // into the parent.
    execFileSync('qemu-img', ['bitmap', '--add', '-f', 'qcow2', c.leaf.path, 'backup-1']);
    writeQcow2(c.leaf.path, 30, 2, 0x55);
    const leafSumWithBitmap = await checksum(c.id, c.leaf.id);
    expect(bitmapsOf(c.mid.path)).toEqual([]);
    await sdmctl('disks', 'delete-snapshot', '-d', dom.id, c.id, c.leaf.id, '--request-id', 'del-leaf', '--wait');
    after = await disk(c.id);
    expect(after.volumes.map((v) => [v.id, v.capacityBytes])).toEqual([[c.mid.id, grown]]);
    expect(await checksum(c.id, c.mid.id)).toBe(leafSumWithBitmap);
    expect(leafSumWithBitmap).not.toBe(leafSum);
    expect(bitmapsOf(c.mid.path)).toEqual([{ name: 'backup-1', flags: ['auto'] }]);
    // One volume left: no snapshot to delete.
    expect(await codeOf(deleteSnapshot('del-only', c.id, c.mid.id))).toEqual(['FAILED_PRECONDITION', 'ONLY_VOLUME']);
    await collectUntilClean();
    expect(await check()).toMatchObject({ ok: true, violations: [] });
  });

  test('bad inputs: documented codes, nothing changed', async () => {
    const c = await chain3('bad');
    const before = await disk(c.id);
    const opsBefore = (await m.api.ops.listOperations({ pageSize: 1000 })).operations.length;
    const missing = '00000000-0000-4000-8000-000000000000';
    const cases: Array<[string, () => Promise<unknown>, [string, string]]> = [
      ['unknown volume', () => deleteSnapshot('bad-1', c.id, missing), ['NOT_FOUND', 'VOLUME_NOT_FOUND']],
      ['volume not a uuid', () => deleteSnapshot('bad-2', c.id, '../../etc'), ['INVALID_ARGUMENT', 'INVALID_ID']],
      ['unknown disk', () => deleteSnapshot('bad-3', missing, c.mid.id), ['NOT_FOUND', 'DISK_NOT_FOUND']],
      ['disk not a uuid', () => deleteSnapshot('bad-4', 'nope', c.mid.id), ['INVALID_ARGUMENT', 'INVALID_DISK_ID']],
      [
        'unknown domain',
        () => m.api.disks.deleteSnapshot({ requestId: 'bad-5', storageDomainId: missing, diskId: c.id, volumeId: c.mid.id }),
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      ['bad request id', () => deleteSnapshot('bad id!', c.id, c.mid.id), ['INVALID_ARGUMENT', 'INVALID_REQUEST_ID']],
    ];
    for (const [what, call, expected] of cases) expect({ what, got: await codeOf(call()) }).toEqual({ what, got: expected });

    // A disk with an ILLEGAL volume (as a failed copy leaves one) other than the merge's two: refused.
    const metadata = hostClient(pb.MetadataTxServiceDefinition, 1, 'metadata-tx');
    try {
      const ref = { domainPath: dom.path, imageId: c.id, volumeId: c.leaf.id };
      await metadata.updateVolume({ ...ref, generation: c.leaf.generation, legality: pb.Legality.LEGALITY_ILLEGAL, operationId: 'test' });
      expect(await codeOf(deleteSnapshot('bad-7', c.id, c.base.id))).toEqual(['FAILED_PRECONDITION', 'DISK_ILLEGAL']);
      await metadata.updateVolume({ ...ref, generation: c.leaf.generation, legality: pb.Legality.LEGALITY_LEGAL, operationId: 'test' });
    } finally {
      metadata.close();
    }

    // A template, and the base of a thin clone (its parent is the template's volume).
    const tmpl = await m.createDisk(dom.id, 16 * MiB, 'create-tmpl');
    await m.done(m.api.disks.markDiskTemplate({ requestId: 'mark-tmpl', storageDomainId: dom.id, diskId: tmpl.id }));
    const cloned = await m.done(m.api.disks.cloneDisk({ requestId: 'clone-tmpl', storageDomainId: dom.id, templateDiskId: tmpl.id }));
    const clone = cloned.result?.$case === 'disk' ? cloned.result.disk : undefined;
    await m.done(m.api.disks.snapshotDisk({ requestId: 'snap-clone', storageDomainId: dom.id, diskId: clone!.id }));
    const opsBeforeRefusals = (await m.api.ops.listOperations({ pageSize: 1000 })).operations.length;
    expect(await codeOf(deleteSnapshot('bad-8', tmpl.id, tmpl.volumes[0]!.id))).toEqual(['FAILED_PRECONDITION', 'DISK_IS_TEMPLATE']);
    expect(await codeOf(deleteSnapshot('bad-9', clone!.id, clone!.volumes[0]!.id))).toEqual(['FAILED_PRECONDITION', 'MERGE_INTO_TEMPLATE']);

    // Nothing changed: the same chain, generations and content; no operation was created by a refusal.
    expect((await m.api.ops.listOperations({ pageSize: 1000 })).operations.length).toBe(opsBeforeRefusals);
    expect(opsBeforeRefusals).toBe(opsBefore + 4);
    const after = await disk(c.id);
    expect(after.volumes.map((v) => [v.id, v.parentId, v.legality])).toEqual(before.volumes.map((v) => [v.id, v.parentId, v.legality]));
    expect(after.volumes[2]!.generation).toBe(before.volumes[2]!.generation);
  });

  /** Pids below `root` whose command line contains `needle` (the mesh's own processes only). */
  const descendants = (root: number): Array<{ pid: number; cmd: string }> => {
    const all = fs
      .readdirSync('/proc')
      .filter((d) => /^\d+$/.test(d))
      .flatMap((d) => {
        try {
          const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
          const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
          return [{ pid: Number(d), ppid, cmd: fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ') }];
        } catch {
          return [];
        }
      });
    const out: Array<{ pid: number; cmd: string }> = [];
    const walk = (pid: number) => all.filter((p) => p.ppid === pid).forEach((p) => (out.push(p), walk(p.pid)));
    walk(root);
    return out;
  };
  /** Starts a merge of the chain's mid volume and waits until its qemu-img commit runs; the host and its processes. */
  const mergeRunning = async (requestId: string, c: { id: string; mid: pb.Volume }) => {
    const op = await deleteSnapshot(requestId, c.id, c.mid.id);
    const until = Date.now() + 60_000;
    for (;;) {
      const now = await m.api.ops.getOperation({ name: op.name });
      const step = now.steps.find((s) => s.name.startsWith('merge-volume:'));
      if (step?.host && (step.progress?.percent ?? 0) > 0) {
        const dataMover = m.hostOf(step.host).services['data-mover']!;
        const procs = descendants(dataMover.process.pid);
        const qemu = procs.find((p) => /qemu-img commit/.test(p.cmd) && !/setpriv/.test(p.cmd));
        if (qemu) {
          const worker = procs.find((p) => /copy-worker/.test(p.cmd) && descendants(p.pid).some((d) => d.pid === qemu.pid))!;
          return { op, host: step.host, dataMover, qemu: qemu.pid, worker: worker.pid };
        }
      }
      if (Date.now() > until) throw new Error(`merge not running: ${JSON.stringify(pb.Operation.toJSON(now))}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  test("merge killed: qemu-img (run again: the merge only goes forward, done), the worker and the host's services (fenced, run again elsewhere: done)", async () => {
    const c1 = await chain3('kill-qemu', 64);
    const [midSum1, leafSum1] = await sums(c1.id, [c1.mid, c1.leaf]);
    const r1 = await mergeRunning('del-kill-qemu', c1);
    process.kill(r1.qemu, 'SIGKILL');
    // The base may hold part of the data: the step runs the idempotent merge again instead of
    // failing with the disk ILLEGAL (a FAILED operation must leave nothing visible).
    const done1 = await m.wait(r1.op.name);
    expect({ status: done1.status, error: done1.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    expect(done1.steps.find((s) => s.name.startsWith('merge-volume:'))!.attempt).toBeGreaterThanOrEqual(2);
    expect(done1.result?.$case === 'disk' && done1.result.disk.volumes.map((v) => v.id)).toEqual([c1.base.id, c1.leaf.id]);
    expect(await sums(c1.id, [c1.base, c1.leaf])).toEqual([midSum1, leafSum1]);

    // The worker killed: its leases go with it; the step fences the base and runs the merge again.
    const c2 = await chain3('kill-worker', 64);
    const [midSum2, leafSum2] = await sums(c2.id, [c2.mid, c2.leaf]);
    const r2 = await mergeRunning('del-kill-worker', c2);
    process.kill(r2.worker, 'SIGKILL');
    const done2 = await m.wait(r2.op.name);
    expect({ status: done2.status, error: done2.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    expect(done2.steps.find((s) => s.name.startsWith('merge-volume:'))!.attempt).toBeGreaterThanOrEqual(2);
    expect(await sums(c2.id, [c2.base, c2.leaf])).toEqual([midSum2, leafSum2]);

    // Every service of the host running the merge killed (its sanlock daemon lives on): the worker
    // and qemu-img die with the data-mover, sanlock frees their leases; the step fences the base
    // and runs the merge again on the other host, which also finalizes.
    const c = await chain3('kill-services', 64);
    const [midSum, leafSum] = await sums(c.id, [c.mid, c.leaf]);
    const r = await mergeRunning('del-kill-services', c);
    deadHosts.add(Number(r.host.replace('host', '')));
    const services = Object.values(m.hostOf(r.host).services).filter((x) => x?.process.running());
    for (const x of services) process.kill(x!.process.pid, 'SIGKILL');
    await Promise.all(services.map((x) => x!.process.exited));
    const op = await m.wait(r.op.name);
    expect({ status: op.status, error: op.error }).toEqual({ status: pb.OperationStatus.OPERATION_STATUS_DONE, error: undefined });
    const step = op.steps.find((s) => s.name.startsWith('merge-volume:'))!;
    expect(step.attempt).toBeGreaterThanOrEqual(2);
    expect(step.host).not.toBe(r.host);
    expect(await sums(c.id, [c.base, c.leaf])).toEqual([midSum, leafSum]);

    await collectUntilClean();
    expect(await check()).toMatchObject({ ok: true, violations: [] });
  });
});
