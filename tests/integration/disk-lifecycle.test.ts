import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pb } from '@sdmesh/common';
import { codeOf, MiB, SchedulerMesh, writeQcow2, writeRandom } from '../harness/scheduler-mesh';

/**
 * ExtendDisk, SparsifyDisk, AmendDisk and dirty bitmaps (issue 15) end to end on a live mesh
 * (2 sanlock hosts, real qemu-img/qemu-io, files): guest-visible content before and after each
 * operation, the chain after a snapshot, sdmctl, workers and host services SIGKILLed mid-job
 * (fault points in the data-mover worker), and bad inputs with nothing changed.
 */

jest.setTimeout(600_000);

const FAULT_FILE = `/var/tmp/sdmesh-disk-lifecycle-fault-${process.pid}`;

// Every host's data-mover workers read the fault file; the GC collects every 2 s without grace.
const m = new SchedulerMesh(2, {}, { SDMESH_WORKER_FAULT_FILE: FAULT_FILE, SDMESH_GRACE_MS: '0', SDMESH_INTERVAL_MS: '2000' });
let domain: pb.StorageDomain;
const SDMCTL = path.resolve(__dirname, '../../packages/sdmctl/dist/cli.js');

beforeAll(async () => {
  await m.start();
  domain = await m.createDomain('lifecycle');
});
afterAll(async () => {
  fs.rmSync(FAULT_FILE, { force: true });
  fs.rmSync(`${FAULT_FILE}.reached`, { force: true });
  await m.stop();
});

/** The guest-visible bytes of a disk (its leaf through the chain) as a raw file; returns its path. */
function guestImage(disk: pb.Disk, name: string): string {
  const leaf = disk.volumes[disk.volumes.length - 1]!;
  const out = path.join(m.dir, `${name}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-f', leaf.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? 'qcow2' : 'raw', '-O', 'raw', leaf.path, out]);
  return out;
}
const sha = (buf: Buffer) => createHash('sha256').update(buf).digest('hex');
const guestSha = (disk: pb.Disk, name: string) => sha(fs.readFileSync(guestImage(disk, name)));
const allocated = (file: string) => fs.statSync(file).blocks * 512;
const getDisk = (diskId: string) => m.api.disks.getDisk({ storageDomainId: domain.id, diskId });
const qemuInfo = (file: string) =>
  JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', file]).toString()) as {
    'virtual-size': number;
    'backing-filename'?: string;
    'format-specific': { data: { compat: string } };
  };

function sdmctl(...args: string[]): { code: number; out: string } {
  const env = {
    ...process.env,
    SDMESH_ADDRESS: m.replicas[0]!.grpcAddress,
    ...m.mesh.nats.clientEnv('sdmctl'),
    ...m.mesh.tlsEnv({ kind: 'user', name: 'admin' }),
  };
  try {
    return { code: 0, out: execFileSync(process.execPath, [SDMCTL, ...args], { env, stdio: 'pipe' }).toString() };
  } catch (err) {
    const e = err as { status: number; stdout: Buffer; stderr: Buffer };
    return { code: e.status, out: e.stdout.toString() + e.stderr.toString() };
  }
}

async function newDisk(name: string, capacity: number, extra: Partial<pb.CreateDiskRequest> = {}): Promise<pb.Disk> {
  return m.createDisk(domain.id, capacity, `create-${name}`, extra);
}

/** `sdmctl check` of the domain: no violation, and (after GC passes) no garbage left. */
async function checkDomain(): Promise<void> {
  const until = Date.now() + 60_000;
  for (;;) {
    const r = sdmctl('check', domain.path, '-o', 'json');
    const report = JSON.parse(r.out) as { ok: boolean; violations: unknown[]; garbage: unknown[]; illegalVolumes: number };
    expect(report.violations).toEqual([]);
    expect(report.ok).toBe(true);
    if (report.garbage.length === 0) return;
    if (Date.now() > until) throw new Error(`garbage left: ${JSON.stringify(report.garbage)}`);
    await new Promise((res) => setTimeout(res, 1000));
  }
}

describe('ExtendDisk', () => {
  it('grows a raw disk: old content intact, the new tail reads as zeros; then a snapshot chain keeps working', async () => {
    const disk = await newDisk('ext-raw', 16 * MiB);
    writeRandom(disk.volumes[0]!.path, 0, 16);
    const before = guestSha(disk, 'ext-raw-before');
    const op = await m.done(m.api.disks.extendDisk({ requestId: 'extend-raw', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 32 * MiB }));
    expect(op.type).toBe(pb.OperationType.OPERATION_TYPE_EXTEND_DISK);
    const after = await getDisk(disk.id);
    expect(after.capacityBytes).toBe(32 * MiB);
    expect(after.volumes[0]!.generation).toBe(disk.volumes[0]!.generation + 1);
    expect(fs.statSync(after.volumes[0]!.path).size).toBe(32 * MiB);
    const img = fs.readFileSync(guestImage(after, 'ext-raw-after'));
    expect(img.length).toBe(32 * MiB);
    expect(sha(img.subarray(0, 16 * MiB))).toBe(before);
    expect(img.subarray(16 * MiB).every((b) => b === 0)).toBe(true);
    // The same request again: the same operation, nothing run twice.
    const again = await m.api.disks.extendDisk({ requestId: 'extend-raw', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 32 * MiB });
    expect(again.name).toBe(op.name);

    // Snapshot, write into the new tail through the qcow2 leaf, extend the leaf again.
    await m.done(m.api.disks.snapshotDisk({ requestId: 'ext-raw-snap', storageDomainId: domain.id, diskId: disk.id }));
    const chain = await getDisk(disk.id);
    writeQcow2(chain.volumes[1]!.path, 24, 4, 0x42);
    const chainBefore = fs.readFileSync(guestImage(chain, 'ext-chain-before'));
    await m.done(m.api.disks.extendDisk({ requestId: 'extend-leaf', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 48 * MiB }));
    const grown = await getDisk(disk.id);
    expect(grown.volumes.map((v) => v.capacityBytes)).toEqual([32 * MiB, 48 * MiB]);
    expect(qemuInfo(grown.volumes[1]!.path)['virtual-size']).toBe(48 * MiB);
    const img2 = fs.readFileSync(guestImage(grown, 'ext-chain-after'));
    expect(sha(img2.subarray(0, 32 * MiB))).toBe(sha(chainBefore));
    expect(img2.subarray(32 * MiB).every((b) => b === 0)).toBe(true);
    // The extended chain copies and moves: the target leaf gets the leaf's capacity.
    const copy = await m.done(
      m.api.disks.copyDisk({ requestId: 'copy-extended', storageDomainId: domain.id, diskId: disk.id, targetStorageDomainId: domain.id }),
    );
    const copied = copy.result?.$case === 'disk' ? copy.result.disk : undefined;
    expect(copied!.volumes.map((v) => v.capacityBytes)).toEqual([32 * MiB, 48 * MiB]);
    expect(guestSha(copied!, 'ext-copy')).toBe(sha(img2));
    await checkDomain();
  });

  it('grows a qcow2 disk with sdmctl (--wait), and refuses shrinking and bad input with nothing changed', async () => {
    const disk = await newDisk('ext-q', 8 * MiB, { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    writeQcow2(disk.volumes[0]!.path, 0, 8, 0x33);
    const before = guestSha(disk, 'ext-q-before');
    const r = sdmctl('disks', 'extend', '--domain', domain.id, disk.id, '--size', '24M', '--wait');
    expect(r.code).toBe(0);
    const after = await getDisk(disk.id);
    expect(after.capacityBytes).toBe(24 * MiB);
    const img = fs.readFileSync(guestImage(after, 'ext-q-after'));
    expect(sha(img.subarray(0, 8 * MiB))).toBe(before);
    expect(img.subarray(8 * MiB).every((b) => b === 0)).toBe(true);

    const gen = after.volumes[0]!.generation;
    const bad = (req: Partial<pb.ExtendDiskRequest>) =>
      codeOf(m.api.disks.extendDisk({ requestId: '', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 32 * MiB, ...req }));
    expect(await bad({ capacityBytes: 8 * MiB })).toEqual(['INVALID_ARGUMENT', 'SHRINK_REFUSED']);
    expect(await bad({ capacityBytes: 0 })).toEqual(['INVALID_ARGUMENT', 'INVALID_CAPACITY']);
    expect(await bad({ capacityBytes: 24 * MiB + 100 })).toEqual(['INVALID_ARGUMENT', 'INVALID_CAPACITY']);
    expect((await bad({ capacityBytes: 2 ** 60 }))[0]).toBe('INVALID_ARGUMENT');
    expect(await bad({ diskId: '0b6f5a3e-1111-4222-8333-944444444444' })).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    expect(await bad({ diskId: 'nope' })).toEqual(['INVALID_ARGUMENT', 'INVALID_DISK_ID']);
    expect(await bad({ storageDomainId: '0b6f5a3e-1111-4222-8333-944444444444' })).toEqual(['NOT_FOUND', 'DOMAIN_NOT_FOUND']);
    const pre = await newDisk('ext-prealloc', MiB, { allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED });
    expect(await bad({ diskId: pre.id, capacityBytes: 2 ** 45 })).toEqual(['RESOURCE_EXHAUSTED', 'INSUFFICIENT_SPACE']);
    const now = await getDisk(disk.id);
    expect(now.capacityBytes).toBe(24 * MiB);
    expect(now.volumes[0]!.generation).toBe(gen);
    expect((await getDisk(pre.id)).capacityBytes).toBe(MiB);
  });

  it.each([
    ['the worker', 'extend.after-illegal', 'kill'],
    ['the worker', 'extend.after-resize', 'kill'],
    ['the worker', 'extend.before-commit', 'kill'],
    ['the data-mover service', 'extend.after-resize', 'kill-service'],
  ])('survives a SIGKILL of %s at %s: DONE on retry, content intact, check clean', async (_who, point, action) => {
    const name = `ext-kill-${point}-${action}`.replace(/[^a-z0-9-]/g, '-');
    const disk = await newDisk(name, 8 * MiB);
    writeRandom(disk.volumes[0]!.path, 0, 8);
    const before = guestSha(disk, `${name}-before`);
    fs.writeFileSync(FAULT_FILE, `${point} ${action}`);
    const op = await m.wait((await m.api.disks.extendDisk({ requestId: name, storageDomainId: domain.id, diskId: disk.id, capacityBytes: 12 * MiB })).name);
    expect(fs.existsSync(FAULT_FILE)).toBe(false); // the fault fired
    expect(op.error).toBeUndefined();
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(op.steps.find((s) => s.name.startsWith('extend:'))!.attempt).toBeGreaterThan(1);
    const after = await getDisk(disk.id);
    expect(after.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(after.capacityBytes).toBe(12 * MiB);
    const img = fs.readFileSync(guestImage(after, `${name}-after`));
    expect(sha(img.subarray(0, 8 * MiB))).toBe(before);
    expect(img.subarray(8 * MiB).every((b) => b === 0)).toBe(true);
    await checkDomain();
    await m.restartDeadDataMovers(2);
  });

  it('a cancelled extend rolls back: storage as before (old capacity, LEGAL)', async () => {
    const disk = await newDisk('ext-cancel', 8 * MiB);
    writeRandom(disk.volumes[0]!.path, 0, 8);
    const before = guestSha(disk, 'ext-cancel-before');
    fs.writeFileSync(FAULT_FILE, 'extend.after-resize pause');
    const started = await m.api.disks.extendDisk({ requestId: 'ext-cancel', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 16 * MiB });
    const until = Date.now() + 60_000;
    while (!fs.existsSync(`${FAULT_FILE}.reached`)) {
      if (Date.now() > until) throw new Error('fault point not reached');
      await new Promise((r) => setTimeout(r, 100));
    }
    fs.rmSync(`${FAULT_FILE}.reached`);
    await m.api.ops.cancelOperation({ name: started.name });
    const op = await m.wait(started.name);
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
    const after = await getDisk(disk.id);
    expect(after.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(after.capacityBytes).toBe(8 * MiB);
    expect(fs.statSync(after.volumes[0]!.path).size).toBe(8 * MiB);
    expect(guestSha(after, 'ext-cancel-after')).toBe(before);
    await checkDomain();
  });
});

describe('SparsifyDisk', () => {
  /** A raw base with 8 MiB of zeros written (allocated) and 2 MiB of data; a qcow2 leaf with 8 MiB of zeros and 2 MiB of data. */
  async function zeroedChain(name: string): Promise<pb.Disk> {
    const disk = await newDisk(name, 32 * MiB);
    const base = disk.volumes[0]!.path;
    execFileSync('dd', ['if=/dev/zero', `of=${base}`, 'bs=1M', 'count=8', 'conv=notrunc', 'status=none']);
    writeRandom(base, 8, 2);
    await m.done(m.api.disks.snapshotDisk({ requestId: `${name}-snap`, storageDomainId: domain.id, diskId: disk.id }));
    const chain = await getDisk(disk.id);
    writeQcow2(chain.volumes[1]!.path, 16, 8, 0);
    writeQcow2(chain.volumes[1]!.path, 24, 2, 0x77);
    return chain;
  }

  it('gives back zeroed space of a raw base and a qcow2 leaf: content identical, allocation smaller', async () => {
    const disk = await zeroedChain('sp');
    const before = guestSha(disk, 'sp-before');
    const sizes = disk.volumes.map((v) => allocated(v.path));
    const r = sdmctl('disks', 'sparsify', '--domain', domain.id, disk.id, '--wait');
    expect(r.code).toBe(0);
    const after = await getDisk(disk.id);
    expect(guestSha(after, 'sp-after')).toBe(before);
    const now = after.volumes.map((v) => allocated(v.path));
    expect(now[0]!).toBeLessThanOrEqual(sizes[0]! - 7 * MiB);
    expect(now[1]!).toBeLessThanOrEqual(sizes[1]! - 7 * MiB);
    expect(after.volumes.map((v) => v.generation)).toEqual(disk.volumes.map((v) => v.generation + 1));
    expect(execFileSync('qemu-img', ['check', '-U', after.volumes[1]!.path]).toString()).toMatch(/No errors/);
    await checkDomain();
  });

  it.each([
    ['the worker', 'sparsify.after-scan', 'kill'],
    ['the worker', 'sparsify.after-first-batch', 'kill'],
    ['the data-mover service', 'sparsify.after-first-batch', 'kill-service'],
    ['the worker', 'sparsify.before-commit', 'kill'],
  ])('survives a SIGKILL of %s at %s: DONE on retry, content identical', async (_who, point, action) => {
    const name = `sp-kill-${point}-${action}`.replace(/[^a-z0-9-]/g, '-');
    const disk = await zeroedChain(name);
    const before = guestSha(disk, `${name}-before`);
    fs.writeFileSync(FAULT_FILE, `${point} ${action}`);
    const op = await m.wait((await m.api.disks.sparsifyDisk({ requestId: name, storageDomainId: domain.id, diskId: disk.id })).name);
    expect(fs.existsSync(FAULT_FILE)).toBe(false);
    expect(op.error).toBeUndefined();
    expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const after = await getDisk(disk.id);
    expect(after.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(guestSha(after, `${name}-after`)).toBe(before);
    expect(allocated(after.volumes[0]!.path)).toBeLessThan(allocated(disk.volumes[0]!.path) + 1);
    await checkDomain();
    await m.restartDeadDataMovers(2);
  });

  it('refuses a preallocated disk and bad input', async () => {
    const pre = await newDisk('sp-pre', MiB, { allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED });
    expect(await codeOf(m.api.disks.sparsifyDisk({ requestId: '', storageDomainId: domain.id, diskId: pre.id }))).toEqual([
      'FAILED_PRECONDITION',
      'VOLUME_PREALLOCATED',
    ]);
    expect(await codeOf(m.api.disks.sparsifyDisk({ requestId: '', storageDomainId: domain.id, diskId: '0b6f5a3e-1111-4222-8333-944444444444' }))).toEqual([
      'NOT_FOUND',
      'DISK_NOT_FOUND',
    ]);
  });
});

describe('AmendDisk', () => {
  it('upgrades every qcow2 volume from compat 0.10 to 1.1: content identical; then bitmaps fit', async () => {
    const disk = await newDisk('amend', 16 * MiB, { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    writeQcow2(disk.volumes[0]!.path, 0, 4, 0x21);
    await m.done(m.api.disks.snapshotDisk({ requestId: 'amend-snap', storageDomainId: domain.id, diskId: disk.id }));
    const chain = await getDisk(disk.id);
    writeQcow2(chain.volumes[1]!.path, 4, 4, 0x22);
    // An old domain's volumes: compat 0.10.
    for (const v of chain.volumes) execFileSync('qemu-img', ['amend', '-f', 'qcow2', '-o', 'compat=0.10', v.path]);
    const before = guestSha(chain, 'amend-before');
    expect(await codeOf(m.api.disks.addDiskBitmap({ requestId: '', storageDomainId: domain.id, diskId: disk.id, bitmap: 'b0' }))).toEqual([
      'FAILED_PRECONDITION',
      'QCOW2_COMPAT_TOO_OLD',
    ]);
    const r = sdmctl('disks', 'amend', '--domain', domain.id, disk.id, '--compat', '1.1', '--wait');
    expect(r.code).toBe(0);
    const after = await getDisk(disk.id);
    expect(after.volumes.map((v) => qemuInfo(v.path)['format-specific'].data.compat)).toEqual(['1.1', '1.1']);
    expect(qemuInfo(after.volumes[1]!.path)['backing-filename']).toBe(chain.volumes[0]!.id);
    expect(guestSha(after, 'amend-after')).toBe(before);
    const { volumes } = await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: disk.id });
    expect(volumes.map((v) => v.qcow2Compat)).toEqual(['1.1', '1.1']);
    // Amending again changes nothing (already 1.1).
    const gens = after.volumes.map((v) => v.generation);
    await m.done(m.api.disks.amendDisk({ requestId: 'amend-again', storageDomainId: domain.id, diskId: disk.id, qcow2Compat: '1.1' }));
    expect((await getDisk(disk.id)).volumes.map((v) => v.generation)).toEqual(gens);
  });

  it('refuses raw disks, other compat levels and unknown disks', async () => {
    const raw = await newDisk('amend-raw', MiB);
    const amend = (req: Partial<pb.AmendDiskRequest>) =>
      codeOf(m.api.disks.amendDisk({ requestId: '', storageDomainId: domain.id, diskId: raw.id, qcow2Compat: '1.1', ...req }));
    expect(await amend({})).toEqual(['FAILED_PRECONDITION', 'NOT_QCOW2']);
    expect(await amend({ qcow2Compat: '0.10' })).toEqual(['INVALID_ARGUMENT', 'INVALID_COMPAT']);
    expect(await amend({ qcow2Compat: '' })).toEqual(['INVALID_ARGUMENT', 'INVALID_COMPAT']);
    expect(await amend({ diskId: '0b6f5a3e-1111-4222-8333-944444444444' })).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
  });
});

describe('dirty bitmaps', () => {
  it('add → listed; a snapshot carries it to the new leaf; remove → gone everywhere; clear', async () => {
    const disk = await newDisk('bm', 16 * MiB, { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    writeQcow2(disk.volumes[0]!.path, 0, 2, 0x31);
    const before = guestSha(disk, 'bm-before');
    expect(sdmctl('disks', 'bitmaps', 'add', '--domain', domain.id, disk.id, 'backup-1', '--wait').code).toBe(0);
    await m.done(
      m.api.disks.addDiskBitmap({ requestId: 'bm-add-2', storageDomainId: domain.id, diskId: disk.id, bitmap: 'backup-2', granularityBytes: 1 << 20 }),
    );
    let listed = await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: disk.id });
    expect(listed.volumes[0]!.bitmaps).toEqual([
      { name: 'backup-1', granularityBytes: 65536, enabled: true, inUse: false },
      { name: 'backup-2', granularityBytes: 1 << 20, enabled: true, inUse: false },
    ]);
    const list = sdmctl('disks', 'bitmaps', 'list', '--domain', domain.id, disk.id);
    expect(list.code).toBe(0);
    expect(list.out).toMatch(/backup-1/);
    expect(await codeOf(m.api.disks.addDiskBitmap({ requestId: '', storageDomainId: domain.id, diskId: disk.id, bitmap: 'backup-1' }))).toEqual([
      'ALREADY_EXISTS',
      'BITMAP_EXISTS',
    ]);

    await m.done(m.api.disks.snapshotDisk({ requestId: 'bm-snap', storageDomainId: domain.id, diskId: disk.id }));
    listed = await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: disk.id });
    expect(listed.volumes.map((v) => v.bitmaps.map((b) => b.name))).toEqual([
      ['backup-1', 'backup-2'],
      ['backup-1', 'backup-2'],
    ]);
    expect(listed.volumes[1]!.bitmaps[1]!.granularityBytes).toBe(1 << 20);
    expect(guestSha(await getDisk(disk.id), 'bm-after-snap')).toBe(before);

    await m.done(m.api.disks.removeDiskBitmap({ requestId: 'bm-remove', storageDomainId: domain.id, diskId: disk.id, bitmap: 'backup-1' }));
    listed = await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: disk.id });
    expect(listed.volumes.map((v) => v.bitmaps.map((b) => b.name))).toEqual([['backup-2'], ['backup-2']]);
    expect(await codeOf(m.api.disks.removeDiskBitmap({ requestId: '', storageDomainId: domain.id, diskId: disk.id, bitmap: 'backup-1' }))).toEqual([
      'NOT_FOUND',
      'BITMAP_NOT_FOUND',
    ]);
    expect(sdmctl('disks', 'bitmaps', 'clear', '--domain', domain.id, disk.id, '--wait').code).toBe(0);
    listed = await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: disk.id });
    expect(listed.volumes.map((v) => v.bitmaps)).toEqual([[], []]);
    expect(guestSha(await getDisk(disk.id), 'bm-after')).toBe(before);
    await checkDomain();
  });

  it('refuses raw disks and bad bitmap names with nothing changed', async () => {
    const raw = await newDisk('bm-raw', MiB);
    const q = await newDisk('bm-q', MiB, { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    const add = (req: Partial<pb.AddDiskBitmapRequest>) =>
      codeOf(m.api.disks.addDiskBitmap({ requestId: '', storageDomainId: domain.id, diskId: q.id, bitmap: 'ok', ...req }));
    expect(await add({ diskId: raw.id })).toEqual(['FAILED_PRECONDITION', 'NOT_QCOW2']);
    expect(await codeOf(m.api.disks.clearDiskBitmaps({ requestId: '', storageDomainId: domain.id, diskId: raw.id }))).toEqual([
      'FAILED_PRECONDITION',
      'NOT_QCOW2',
    ]);
    expect(await codeOf(m.api.disks.removeDiskBitmap({ requestId: '', storageDomainId: domain.id, diskId: raw.id, bitmap: 'x' }))).toEqual([
      'FAILED_PRECONDITION',
      'NOT_QCOW2',
    ]);
    for (const bitmap of ['', '../../etc/passwd', '--remove', 'a b', 'x'.repeat(129), 'bitmäp', 'a/b', '.hidden', 'a\u0000b']) {
      expect(await add({ bitmap })).toEqual(['INVALID_ARGUMENT', 'INVALID_BITMAP_NAME']);
    }
    expect(await add({ granularityBytes: 1000 })).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']);
    expect(await add({ diskId: '0b6f5a3e-1111-4222-8333-944444444444' })).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    expect(await codeOf(m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: 'nope' }))).toEqual(['INVALID_ARGUMENT', 'INVALID_DISK_ID']);
    expect((await m.api.disks.listDiskBitmaps({ storageDomainId: domain.id, diskId: q.id })).volumes[0]!.bitmaps).toEqual([]);
    expect((await getDisk(q.id)).volumes[0]!.generation).toBe(q.volumes[0]!.generation);
  });
});
