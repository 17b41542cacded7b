import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { REPO_ROOT } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh, writeRandom } from '../harness/scheduler-mesh';

const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');

/** sha256 of a file's guest-visible content, as qemu-img sees it (`convert -O raw`), zero-padded to `padTo` bytes. */
function rawSha256(file: string, dir: string, padTo = 0): string {
  const raw = path.join(dir, `${path.basename(file)}.check.raw`);
  execFileSync('qemu-img', ['convert', '-O', 'raw', file, raw]);
  const hash = createHash('sha256').update(fs.readFileSync(raw));
  const size = fs.statSync(raw).size;
  if (padTo > size) hash.update(Buffer.alloc(padTo - size));
  fs.rmSync(raw);
  return hash.digest('hex');
}

/**
 * ImportDisk end to end on a real mesh (2 sanlock hosts, every service a process, qemu-img):
 * raw and qcow2 files made here with random data are imported on the host named in the
 * request; the imported disk's checksum (data-mover ChecksumVolume) equals sha256 of
 * `qemu-img convert -O raw <file>`; bad inputs get their codes and create nothing.
 */
describe('ImportDisk: a host file into a new disk', () => {
  const m = new SchedulerMesh(2);
  let dom: pb.StorageDomain;
  let files: string;

  beforeAll(async () => {
    // The hosts' only import directory (imports are disabled without one); services inherit the env.
    files = path.join(m.dir, 'import-files');
    fs.mkdirSync(files);
    process.env.SDMESH_IMPORT_DIRS = files;
    await m.start();
    dom = await m.createDomain('dom-import');
  }, 120_000);
  afterAll(async () => {
    delete process.env.SDMESH_IMPORT_DIRS;
    await m.stop();
  }, 60_000);

  const importDone = async (requestId: string, sourcePath: string, extra: Partial<pb.ImportDiskRequest> = {}) => {
    const op = await m.done(m.api.disks.importDisk({ requestId, storageDomainId: dom.id, host: 'host2', sourcePath, ...extra }));
    if (op.result?.$case !== 'disk') throw new Error('no disk in result');
    return { op, disk: op.result.disk };
  };
  const checksum = async (disk: pb.Disk) => {
    const mover = createClient(pb.DataMoverServiceDefinition, m.mesh.hosts[0]!.services['data-mover']!.grpcAddress, m.mesh.credentials({ kind: 'scheduler' }));
    try {
      return (await mover.checksumVolume({ volume: { domainPath: dom.path, imageId: disk.id, volumeId: disk.volumes[0]!.id } }, { timeoutMs: 60_000 }))
        .checksum;
    } finally {
      mover.close();
    }
  };

  test('a raw file (sparse, random data) and a qcow2 file are imported on the named host; checksums match', async () => {
    const raw = path.join(files, 'disk.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 48 * MiB);
    writeRandom(raw, 4, 12);
    writeRandom(raw, 40, 2);
    const tmp = path.join(files, 'tmp.raw');
    fs.writeFileSync(tmp, '');
    fs.truncateSync(tmp, 32 * MiB);
    writeRandom(tmp, 1, 9);
    const qcow2 = path.join(files, 'disk.qcow2');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', tmp, qcow2]);
    fs.rmSync(tmp);

    // InspectFile on the host itself.
    const mover2 = createClient(
      pb.DataMoverServiceDefinition,
      m.hostOf('host2').services['data-mover']!.grpcAddress,
      m.mesh.credentials({ kind: 'scheduler' }),
    );
    const info = await mover2.inspectFile({ path: qcow2 }, { timeoutMs: 30_000 });
    expect(info).toMatchObject({ format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2, virtualSizeBytes: 32 * MiB });
    expect(info.actualSizeBytes).toBeGreaterThan(9 * MiB);
    expect(info.actualSizeBytes).toBeLessThan(32 * MiB);

    const [r, q] = await Promise.all([importDone('import-raw', raw, { description: 'raw import' }), importDone('import-qcow2', qcow2)]);
    for (const { op } of [r, q]) {
      expect(op.steps.map((s) => s.name.split(':')[0])).toEqual(['inspect-file', 'create-target', 'import-volume']);
      expect(op.steps.find((s) => s.name.startsWith('import-volume'))!.host).toBe('host2');
      expect(op.progress?.percent).toBe(100);
      expect(op.type).toBe(pb.OperationType.OPERATION_TYPE_IMPORT_DISK);
    }
    expect(r.disk).toMatchObject({
      capacityBytes: 48 * MiB,
      format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
      description: 'raw import',
      legality: pb.Legality.LEGALITY_LEGAL,
    });
    expect(q.disk).toMatchObject({ capacityBytes: 32 * MiB, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2, legality: pb.Legality.LEGALITY_LEGAL });
    expect(await checksum(r.disk)).toBe(rawSha256(raw, files));
    expect(await checksum(q.disk)).toBe(rawSha256(qcow2, files));
    // Sparse stays sparse: 14 MiB of data in a 48 MiB raw volume.
    expect(fs.statSync(r.disk.volumes[0]!.path).blocks * 512).toBeLessThan(24 * MiB);
    // The source files are untouched.
    expect(fs.existsSync(raw) && fs.existsSync(qcow2)).toBe(true);

    // The data-mover job read the file (no source volume).
    const { jobs } = await mover2.listJobs({});
    const job = jobs.find((j) => j.sourceFile === raw)!;
    expect(job.status).toBe(pb.JobStatus.JOB_STATUS_DONE);
    expect(job.source).toBeUndefined();
    // Exactly one of source and source_file.
    expect(
      await codeOf(
        mover2.copyVolume({
          jobId: 'both-sources',
          sourceFile: raw,
          source: { domainPath: dom.path, imageId: q.disk.id, volumeId: q.disk.volumes[0]!.id },
          destination: { domainPath: dom.path, imageId: r.disk.id, volumeId: r.disk.volumes[0]!.id },
          destinationGeneration: 1,
        }),
      ),
    ).toEqual(['INVALID_ARGUMENT', 'SOURCE_CONFLICT']);
    mover2.close();
  });

  test('an odd-sized raw file into a qcow2 disk: capacity rounded up to 512, content zero-padded', async () => {
    const odd = path.join(files, 'odd.img');
    fs.writeFileSync(odd, Buffer.concat([Buffer.from('not a qcow2 header '), createHash('sha512').update('x').digest(), Buffer.alloc(1_000_000 - 83, 7)]));
    const { disk } = await importDone('import-odd', odd, { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    expect(disk.capacityBytes).toBe(1_000_448);
    expect(disk.format).toBe(pb.VolumeFormat.VOLUME_FORMAT_QCOW2);
    expect(await checksum(disk)).toBe(rawSha256(odd, files, 1_000_448));
  });

  test('sdmctl disks import --wait works end to end', async () => {
    const raw = path.join(files, 'cli.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 8 * MiB);
    writeRandom(raw, 2, 3);
    const env = { ...process.env, SDMESH_ADDRESS: m.replicas[0]!.grpcAddress, ...m.mesh.tlsEnv({ kind: 'user', name: 'admin' }), SDMCTL_OUTPUT: '' };
    const out = await new Promise<{ code: number; out: string; err: string }>((resolve) =>
      execFile(
        process.execPath,
        [SDMCTL, 'disks', 'import', '--domain', dom.id, '--host', 'host1', '--source', raw, '--format', 'qcow2', '--wait', '-o', 'json'],
        { env, timeout: 120_000 },
        (err, stdout, stderr) => resolve({ code: err ? Number((err as { code?: number }).code ?? -1) : 0, out: stdout, err: stderr }),
      ),
    );
    expect(out).toMatchObject({ code: 0 });
    const parsed = JSON.parse(out.out) as { status?: string; result?: { disk?: { id: string } }; disk?: { id: string } };
    const diskId = parsed.result?.disk?.id ?? parsed.disk?.id;
    expect(diskId).toBeDefined();
    const disk = await m.api.disks.getDisk({ storageDomainId: dom.id, diskId: diskId! });
    expect(disk.format).toBe(pb.VolumeFormat.VOLUME_FORMAT_QCOW2);
    expect(await checksum(disk)).toBe(rawSha256(raw, files));
  });

  test('bad inputs: documented codes, no operation, no disk', async () => {
    const before = (await m.api.disks.listDisks({ storageDomainId: dom.id })).disks.length;
    const dir = path.join(files, 'a-directory');
    fs.mkdirSync(dir);
    const base = path.join(files, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(MiB, 1));
    const withBacking = path.join(files, 'with-backing.qcow2');
    execFileSync('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'raw', withBacking], { stdio: 'ignore' });
    const empty = path.join(files, 'empty.raw');
    fs.writeFileSync(empty, '');
    const outLink = path.join(files, 'link-out.raw');
    fs.symlinkSync('/etc/passwd', outLink);
    const fifo = path.join(files, 'fifo.raw');
    execFileSync('mkfifo', [fifo]);
    const anyVolume = (await m.api.disks.listDisks({ storageDomainId: dom.id })).disks[0]!.volumes[0]!.path;
    const cases: Array<[string, Partial<pb.ImportDiskRequest>, [string, string]]> = [
      ['relative path', { sourcePath: 'import-files/disk.raw' }, ['INVALID_ARGUMENT', 'INVALID_PATH']],
      ['path with ..', { sourcePath: `${files}/../import-files/disk.raw` }, ['INVALID_ARGUMENT', 'INVALID_PATH']],
      ['double slash', { sourcePath: `${files}//disk.raw` }, ['INVALID_ARGUMENT', 'INVALID_PATH']],
      ['empty path', { sourcePath: '' }, ['INVALID_ARGUMENT', 'INVALID_PATH']],
      ['missing file', { sourcePath: path.join(files, 'nope.raw') }, ['NOT_FOUND', 'SOURCE_NOT_FOUND']],
      ['a directory', { sourcePath: dir }, ['FAILED_PRECONDITION', 'SOURCE_NOT_REGULAR_FILE']],
      ['an empty file', { sourcePath: empty }, ['FAILED_PRECONDITION', 'SOURCE_EMPTY']],
      ['a qcow2 with a backing file', { sourcePath: withBacking }, ['FAILED_PRECONDITION', 'SOURCE_HAS_BACKING_FILE']],
      ['a volume inside a storage domain', { sourcePath: anyVolume }, ['FAILED_PRECONDITION', 'SOURCE_OUTSIDE_IMPORT_DIRS']],
      ["a domain's dom_md", { sourcePath: path.join(dom.path, 'dom_md', 'metadata') }, ['FAILED_PRECONDITION', 'SOURCE_OUTSIDE_IMPORT_DIRS']],
      ['a file outside the import directories', { sourcePath: '/etc/passwd' }, ['FAILED_PRECONDITION', 'SOURCE_OUTSIDE_IMPORT_DIRS']],
      ['/proc', { sourcePath: '/proc/self/environ' }, ['FAILED_PRECONDITION', 'SOURCE_OUTSIDE_IMPORT_DIRS']],
      ['a symlink in an import directory pointing out', { sourcePath: outLink }, ['FAILED_PRECONDITION', 'SYMLINK_REFUSED']],
      ['a FIFO in an import directory', { sourcePath: fifo }, ['FAILED_PRECONDITION', 'SOURCE_NOT_REGULAR_FILE']],
      ['unknown host', { host: 'host9', sourcePath: path.join(files, 'disk.raw') }, ['NOT_FOUND', 'HOST_NOT_FOUND']],
      ['no host', { host: '', sourcePath: path.join(files, 'disk.raw') }, ['INVALID_ARGUMENT', 'INVALID_HOST']],
      [
        'unknown domain',
        { storageDomainId: '00000000-0000-4000-8000-000000000000', sourcePath: path.join(files, 'disk.raw') },
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      ['unknown format', { format: 9 as pb.VolumeFormat, sourcePath: path.join(files, 'disk.raw') }, ['INVALID_ARGUMENT', 'INVALID_FORMAT']],
    ];
    const got: Array<[string, [string, string]]> = [];
    for (const [i, [name, req]] of cases.entries()) {
      got.push([name, await codeOf(m.api.disks.importDisk({ requestId: `bad-import-${i}`, storageDomainId: dom.id, host: 'host1', ...req }))]);
    }
    expect(got).toEqual(cases.map(([name, , want]) => [name, want]));
    const { operations } = await m.api.ops.listOperations({ filter: 'type=IMPORT_DISK' });
    expect(operations.filter((o) => o.requestId.startsWith('bad-import-'))).toEqual([]);
    expect((await m.api.disks.listDisks({ storageDomainId: dom.id })).disks.length).toBe(before);
  });
});
