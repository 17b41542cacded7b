import { execFile, execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { checkHealth, createClient, GrpcStatus, newTxId, pb, SdmeshError } from '@sdmesh/common';
import { REPO_ROOT } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh, sha256File, writeRandom } from '../harness/scheduler-mesh';

const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const T = { timeoutMs: 60_000 };

/**
 * Shared storage as a hostile party writes it (real services, real qemu-img, real sanlock).
 * In a live domain: symlinks at every kind of name, hard links, FIFOs, device nodes,
 * directories where files belong, raw disks whose guest wrote image headers naming host files.
 * Every operation that meets them refuses or skips with a reason; sentinel files outside the
 * domain keep their bytes and mtimes; no service dies. Plus imports from outside the import
 * directories or swapped under the copy, and domain paths outside the roots or nested.
 */
describe('hostile storage', () => {
  const m = new SchedulerMesh(2);
  let outside: string;
  let importDir: string;
  let dom: pb.StorageDomain;
  let dom2: pb.StorageDomain;
  let sentinels: string[];
  let before: Map<string, string>;

  /** Bytes, mode and mtime of every sentinel (directories: their listing). */
  const snapshot = () =>
    new Map(
      sentinels.map((p) => {
        const st = fs.lstatSync(p);
        const what = st.isFile() ? sha256File(p) : st.isDirectory() ? fs.readdirSync(p).sort().join(',') : st.isFIFO() ? 'fifo' : '?';
        return [p, `${what} ${st.mode.toString(8)} ${st.mtimeMs} ${st.size}`];
      }),
    );
  /** Nobody holds the FIFO sentinel open for reading (opening it for writing would block otherwise). */
  const fifoUnopened = (fifo: string) => {
    try {
      const fd = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
      fs.closeSync(fd);
      return false; // a reader exists: something opened it
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'ENXIO';
    }
  };

  const scheduler = () => m.mesh.credentials({ kind: 'scheduler' });
  const hostClient = <D extends Parameters<typeof createClient>[0]>(def: D, host: number, svc: 'metadata-tx' | 'data-mover' | 'gc') =>
    createClient(def, m.mesh.hosts[host - 1]!.services[svc]!.grpcAddress, scheduler());

  /** An operation's end as [status, reason, message], or the call's refusal as [code, reason, message]. */
  const outcome = async (submit: Promise<pb.Operation>): Promise<[string, string, string]> => {
    let op: pb.Operation;
    try {
      op = await m.wait((await submit).name);
    } catch (err) {
      const e = SdmeshError.fromGrpc(err);
      return [GrpcStatus[e.code] ?? String(e.code), e.reason, e.message];
    }
    return [pb.OperationStatus[op.status]!.replace('OPERATION_STATUS_', ''), op.error?.reason ?? '', op.error?.message ?? ''];
  };
  const refusedWith = async (p: Promise<unknown>) => {
    try {
      await p;
      return ['OK', '', ''];
    } catch (err) {
      const e = SdmeshError.fromGrpc(err);
      return [GrpcStatus[e.code] ?? String(e.code), e.reason, e.message];
    }
  };
  const sdmctl = (...args: string[]): Promise<{ code: number; out: string; err: string }> =>
    new Promise((resolve) => {
      execFile(process.execPath, [SDMCTL, ...args], { env: { PATH: process.env.PATH }, timeout: 60_000 }, (err, out, stderr) => {
        resolve({ code: err ? ((err as { code?: number }).code ?? -1) : 0, out, err: stderr });
      });
    });

  const disk = (name: string) => m.createDisk(dom.id, MiB, `disk-${name}`, { description: name });
  const files = (d: pb.Disk) => {
    const v = d.volumes[0]!;
    const dir = path.join(dom.path, 'images', d.id);
    return { dir, data: path.join(dir, v.id), meta: path.join(dir, `${v.id}.meta`), volumeId: v.id };
  };
  const volumeRef = (d: pb.Disk) => ({ domainPath: dom.path, imageId: d.id, volumeId: d.volumes[0]!.id });

  beforeAll(async () => {
    importDir = path.join(m.dir, 'import');
    fs.mkdirSync(importDir);
    // Services inherit the environment: one import directory, one copy at a time (the swap case queues a job).
    process.env.SDMESH_IMPORT_DIRS = importDir;
    process.env.SDMESH_MAX_CONCURRENT_JOBS = '1';
    await m.start();
    dom = await m.createDomain('hostile', { path: path.join(m.mesh.storageDir, 'site', 'hostile') });
    dom2 = await m.createDomain('target');

    // Sentinels outside every domain (and outside the storage root).
    outside = path.join(m.dir, 'outside');
    fs.mkdirSync(path.join(outside, 'dir'), { recursive: true });
    fs.writeFileSync(path.join(outside, 'secret'), 'root-only host secret\n'.repeat(1000), { mode: 0o600 });
    fs.writeFileSync(path.join(outside, 'victim'), Buffer.alloc(MiB, 0x11));
    fs.writeFileSync(path.join(outside, 'dir', 'keep'), 'keep me');
    execFileSync('mkfifo', [path.join(outside, 'fifo')]);
    sentinels = ['secret', 'victim', 'dir', 'dir/keep', 'fifo'].map((n) => path.join(outside, n));
    // A file older than the mtime resolution, so a touch would show.
    for (const s of sentinels) fs.utimesSync(s, new Date(2020, 0, 1), new Date(2020, 0, 1));
    before = snapshot();
  }, 180_000);

  afterAll(async () => {
    delete process.env.SDMESH_IMPORT_DIRS;
    delete process.env.SDMESH_MAX_CONCURRENT_JOBS;
    await m.stop();
  }, 60_000);

  afterEach(() => {
    expect(snapshot()).toEqual(before);
    expect(fifoUnopened(path.join(outside, 'fifo'))).toBe(true);
  });

  test('new files have the documented modes (volumes 0660, records 0640, directories 0770)', async () => {
    const d = await disk('modes');
    const f = files(d);
    const mode = (p: string) => (fs.statSync(p).mode & 0o7777).toString(8);
    expect([mode(dom.path), mode(path.join(dom.path, 'dom_md')), mode(path.join(dom.path, 'images')), mode(f.dir)]).toEqual(['770', '770', '770', '770']);
    expect([mode(f.data), mode(f.meta), mode(path.join(dom.path, 'dom_md', 'metadata'))]).toEqual(['660', '640', '640']);
  });

  test('planted volume files (symlink to a host file, hard link, FIFO, device, directory): every operation refuses, nothing outside changes', async () => {
    const plants: Array<[string, (f: ReturnType<typeof files>) => void, string[]]> = [
      ['data symlink', (f) => (fs.rmSync(f.data), fs.symlinkSync(path.join(outside, 'secret'), f.data)), ['SYMLINK_REFUSED']],
      ['hard link', (f) => fs.linkSync(f.data, path.join(outside, 'hardlink-of-volume')), ['HARD_LINK_REFUSED']],
      ['FIFO', (f) => (fs.rmSync(f.data), execFileSync('mkfifo', [f.data])), ['UNEXPECTED_FILE_TYPE']],
      ['char device (/dev/zero)', (f) => (fs.rmSync(f.data), execFileSync('mknod', [f.data, 'c', '1', '5'])), ['UNEXPECTED_FILE_TYPE']],
      ['directory', (f) => (fs.rmSync(f.data), fs.mkdirSync(f.data)), ['UNEXPECTED_FILE_TYPE']],
      [
        '.meta symlink',
        (f) => (fs.copyFileSync(f.meta, path.join(outside, 'meta-copy')), fs.rmSync(f.meta), fs.symlinkSync(path.join(outside, 'meta-copy'), f.meta)),
        ['SYMLINK_REFUSED', 'DISK_NOT_FOUND'],
      ],
    ];
    const disks = await Promise.all(plants.map(([name]) => disk(name.replace(/\W+/g, '-'))));
    const clean = await disk('clean-source');
    plants.forEach(([, plant], i) => plant(files(disks[i]!)));
    // The outside names the plants made are sentinels too from now on.
    sentinels.push(path.join(outside, 'hardlink-of-volume'), path.join(outside, 'meta-copy'));
    before = snapshot();

    const mover = hostClient(pb.DataMoverServiceDefinition, 1, 'data-mover');
    const mt = hostClient(pb.MetadataTxServiceDefinition, 1, 'metadata-tx');
    try {
      for (const [i, [name, , reasons]] of plants.entries()) {
        const d = disks[i]!;
        const results: Record<string, string[]> = {};
        results.copy = await outcome(m.api.disks.copyDisk({ requestId: `copy-${i}`, storageDomainId: dom.id, diskId: d.id, targetStorageDomainId: dom2.id }));
        results.move = await outcome(m.api.disks.moveDisk({ requestId: `move-${i}`, storageDomainId: dom.id, diskId: d.id, targetStorageDomainId: dom2.id }));
        results.checksum = await refusedWith(mover.checksumVolume({ volume: volumeRef(d) }, T));
        // A copy INTO the planted volume: the data-mover would write through it.
        const src = clean;
        results.copyInto = await refusedWith(
          (async () => {
            const job = await mover.copyVolume(
              {
                jobId: `into-${i}`,
                source: { domainPath: dom.path, imageId: src.id, volumeId: src.volumes[0]!.id },
                destination: volumeRef(d),
                destinationGeneration: 0,
              },
              T,
            );
            for (;;) {
              const j = await mover.getJob({ jobId: job.id }, T);
              if (j.status === pb.JobStatus.JOB_STATUS_DONE) return j;
              if (j.status === pb.JobStatus.JOB_STATUS_FAILED) throw new SdmeshError(j.error?.code ?? 2, j.error?.message ?? '', j.error?.reason);
              await new Promise((r) => setTimeout(r, 200));
            }
          })(),
        );
        results.get = await refusedWith(m.api.disks.getDisk({ storageDomainId: dom.id, diskId: d.id }));
        results.volume = await refusedWith(mt.getVolume({ domainPath: dom.path, imageId: d.id, volumeId: d.volumes[0]!.id }, T));
        results.snapshot = await outcome(m.api.disks.snapshotDisk({ requestId: `snap-${i}`, storageDomainId: dom.id, diskId: d.id }));
        results.delete = await outcome(m.api.disks.deleteDisk({ requestId: `del-${i}`, storageDomainId: dom.id, diskId: d.id }));
        // Logged: the record of what each operation answered.
        console.log(`hostile plant ${name}: ${JSON.stringify(results)}`);
        // Everything that reads or writes the volume's bytes is refused, with a reason naming the plant.
        for (const op of ['copy', 'move', 'checksum', 'copyInto']) {
          const [code, reason, message] = results[op]!;
          expect({ plant: name, op, code, reason, message }).toEqual({
            plant: name,
            op,
            code: expect.not.stringMatching(/^(OK|DONE)$/),
            reason: expect.stringMatching(new RegExp(`^(${reasons.join('|')})$`)),
            message,
          });
        }
        // A snapshot would stack on data that cannot be checked: refused too. Delete is a rename
        // inside the domain (the GC later skips what is not a regular file) and may succeed.
        expect({ plant: name, snapshot: results.snapshot![0] }).not.toEqual({ plant: name, snapshot: 'DONE' });
        if (name === '.meta symlink') {
          // A record that is a symlink is never read: the public API does not see the disk (it is skipped).
          expect(results.get![0]).not.toBe('OK');
          expect(results.volume![1]).toBe('SYMLINK_REFUSED');
        }
      }
      // ListDisks still answers: the planted disks are listed or skipped, never followed.
      const listed = await m.api.disks.listDisks({ storageDomainId: dom.id });
      expect(listed.disks.length).toBeGreaterThan(0);
    } finally {
      mover.close();
      mt.close();
      // An operator's repair: the symlinked record back as a file. Until then the domain refuses
      // new volumes (a record it cannot read may claim any lease slot).
      for (const img of fs.readdirSync(path.join(dom.path, 'images'))) {
        const dir = path.join(dom.path, 'images', img);
        if (!fs.lstatSync(dir).isDirectory()) continue;
        for (const n of fs.readdirSync(dir)) {
          if (n.endsWith('.meta') && fs.lstatSync(path.join(dir, n)).isSymbolicLink()) {
            fs.rmSync(path.join(dir, n));
            fs.copyFileSync(path.join(outside, 'meta-copy'), path.join(dir, n));
          }
        }
      }
    }
  }, 300_000);

  test('raw disks whose guest wrote a qcow2 header, a vmdk descriptor, a json: backing name: still raw everywhere, the FIFO is never opened', async () => {
    const fifo = path.join(outside, 'fifo');
    const headers = path.join(m.dir, 'headers');
    fs.mkdirSync(headers);
    const qcow2 = path.join(headers, 'h.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', fifo, '-F', 'raw', qcow2, '1M']);
    const json = path.join(headers, 'j.qcow2');
    execFileSync('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-u',
      '-b',
      `json:{"driver":"raw","file":{"driver":"file","filename":"${fifo}"}}`,
      '-F',
      'raw',
      json,
      '1M',
    ]);
    const vmdk = Buffer.from(
      `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\nRW 2048 FLAT "${fifo}" 0\n\nddb.virtualHWVersion = "4"\n`,
    );
    const payloads: Array<[string, Buffer]> = [
      ['qcow2 header', fs.readFileSync(qcow2).subarray(0, 64 * 1024)],
      ['json: backing', fs.readFileSync(json).subarray(0, 64 * 1024)],
      ['vmdk descriptor', vmdk],
    ];
    const mover = hostClient(pb.DataMoverServiceDefinition, 2, 'data-mover');
    try {
      for (const [i, [name, payload]] of payloads.entries()) {
        const d = await disk(`guest-${i}`);
        const f = files(d);
        const fd = fs.openSync(f.data, 'r+');
        fs.writeSync(fd, payload, 0, payload.length, 0);
        fs.closeSync(fd);
        const sha = sha256File(f.data);
        // The data-mover's checksum reads the raw bytes (the file is exactly the capacity).
        const sum = await mover.checksumVolume({ volume: volumeRef(d) }, T);
        expect({ name, sum: sum.checksum }).toEqual({ name, sum: sha });
        const copy = await outcome(
          m.api.disks.copyDisk({ requestId: `guest-copy-${i}`, storageDomainId: dom.id, diskId: d.id, targetStorageDomainId: dom2.id }),
        );
        expect({ name, copy: copy[0] }).toEqual({ name, copy: 'DONE' });
        const snap = await outcome(m.api.disks.snapshotDisk({ requestId: `guest-snap-${i}`, storageDomainId: dom.id, diskId: d.id }));
        expect({ name, snap: snap[0] }).toEqual({ name, snap: 'DONE' });
        const got = await m.api.disks.getDisk({ storageDomainId: dom.id, diskId: d.id });
        expect(got.volumes[0]!.format).toBe(pb.VolumeFormat.VOLUME_FORMAT_RAW);
        expect(got.volumes[0]!.capacityBytes).toBe(MiB);
        // The copies in dom2 carry the same raw bytes.
        const copies = (await m.api.disks.listDisks({ storageDomainId: dom2.id })).disks.filter((x) => x.description === d.description);
        expect(copies).toHaveLength(1);
        const copied = path.join(dom2.path, 'images', copies[0]!.id, copies[0]!.volumes[0]!.id);
        expect({ name, copy: sha256File(copied) }).toEqual({ name, copy: sha });
        expect(fifoUnopened(fifo)).toBe(true);
      }
    } finally {
      mover.close();
    }
  }, 240_000);

  test('planted names in images/ and dom_md/ (symlinked image dir, _tx_ and _deleted_ links, garbage FIFO): list, GC and check skip and report them', async () => {
    const images = path.join(dom.path, 'images');
    const old = Date.now() - 3600_000;
    const plants = {
      imageLink: path.join(images, randomUUID()),
      txLink: path.join(images, `_tx_${newTxId(1, 4242, old)}_${randomUUID()}`),
      deletedLink: path.join(images, `_deleted_${randomUUID()}_${old}`),
      deletedFifo: path.join(images, `_deleted_${randomUUID()}_${old}`),
    };
    fs.symlinkSync(path.join(outside, 'dir'), plants.imageLink);
    fs.symlinkSync(path.join(outside, 'dir'), plants.txLink);
    fs.symlinkSync(path.join(outside, 'dir'), plants.deletedLink);
    execFileSync('mkfifo', [plants.deletedFifo]);
    for (const p of Object.values(plants)) fs.lutimesSync(p, new Date(old), new Date(old));
    // A dom_md file that is a symlink (sanlock and sdmesh never use this name; check must not follow it either).
    fs.symlinkSync(path.join(outside, 'secret'), path.join(dom.path, 'dom_md', 'inbox'));

    // Listing disks skips what is not an image directory.
    const listed = await m.api.disks.listDisks({ storageDomainId: dom.id });
    expect(listed.disks.map((d) => d.id)).not.toContain(path.basename(plants.imageLink));
    expect((await codeOf(m.api.disks.getDisk({ storageDomainId: dom.id, diskId: path.basename(plants.imageLink) })))[0]).not.toBe('OK');

    // GC on both hosts: the planted garbage is skipped and reported, the outside directory keeps its file.
    for (const host of [1, 2]) {
      const gc = hostClient(pb.GcServiceDefinition, host, 'gc');
      try {
        const { passes } = await gc.collectGarbage({ domainPath: dom.path }, { timeoutMs: 120_000 });
        const pass = passes[0]!;
        if (pass.collected) {
          const report = pass.errors.join('\n');
          expect(report).toMatch(/symbolic link|symlink/i);
          expect(report).toMatch(/fifo|FIFO/);
        }
      } finally {
        gc.close();
      }
    }
    for (const p of Object.values(plants)) expect(fs.lstatSync(p, { throwIfNoEntry: false })).toBeDefined();

    // sdmctl check reports every odd entry and follows none.
    const check = await sdmctl('check', dom.path, '-o', 'json');
    expect(check.err).toBe('');
    const report = JSON.parse(check.out) as {
      ok: boolean;
      warnings?: Array<{ check: string; path?: string; message: string }>;
      violations: Array<{ check: string; path?: string; message: string }>;
    };
    const findings = [...(report.warnings ?? []), ...report.violations].map((f) => `${f.check} ${f.path ?? ''} ${f.message}`).join('\n');
    for (const p of [plants.imageLink, plants.txLink, plants.deletedLink, plants.deletedFifo]) expect(findings).toContain(path.basename(p));
    expect(findings).toMatch(/unexpected-entry-type/);
    expect(findings).toContain('inbox');
  }, 240_000);

  test('dom_md/metadata replaced by a symlink (domain 2): reads and creates are refused; check reports it', async () => {
    const md = path.join(dom2.path, 'dom_md', 'metadata');
    const saved = path.join(outside, 'metadata-copy');
    fs.copyFileSync(md, saved);
    sentinels.push(saved);
    before = snapshot();
    fs.rmSync(md);
    fs.symlinkSync(saved, md);
    try {
      const create = await outcome(m.api.disks.createDisk({ requestId: 'on-symlinked-md', storageDomainId: dom2.id, capacityBytes: MiB }));
      expect(create[0]).not.toBe('DONE');
      // The scheduler sees the domain unreadable (DOMAIN_NOT_ACTIVE) or the host refuses the link.
      expect(['SYMLINK_REFUSED', 'DOMAIN_NOT_ACTIVE']).toContain(create[1]);
      const mt = hostClient(pb.MetadataTxServiceDefinition, 2, 'metadata-tx');
      try {
        // GetDomain reports the domain INVALID, saying why, and reads nothing through the link.
        const got = await mt.getDomain({ path: dom2.path }, T);
        expect(got.status).toBe(pb.DomainStatus.DOMAIN_STATUS_INVALID);
        expect(got.statusMessage).toMatch(/symbolic link: refused/);
      } finally {
        mt.close();
      }
      const check = await sdmctl('check', dom2.path);
      expect(check.code).not.toBe(0);
      expect(check.out + check.err).toMatch(/symbolic link|SYMLINK/i);
    } finally {
      fs.rmSync(md);
      fs.copyFileSync(saved, md);
    }
  }, 120_000);

  test('import: outside the import dirs, a symlink out of them, a file swapped between inspect and copy → refused, nothing imported', async () => {
    const disksBefore = (await m.api.disks.listDisks({ storageDomainId: dom.id })).disks.length;
    const imp = (requestId: string, sourcePath: string) => outcome(m.api.disks.importDisk({ requestId, storageDomainId: dom.id, host: 'host2', sourcePath }));
    expect((await imp('imp-outside', path.join(outside, 'secret'))).slice(0, 2)).toEqual(['FAILED_PRECONDITION', 'SOURCE_OUTSIDE_IMPORT_DIRS']);
    fs.symlinkSync(path.join(outside, 'secret'), path.join(importDir, 'link.raw'));
    expect((await imp('imp-link', path.join(importDir, 'link.raw')))[1]).toBe('SYMLINK_REFUSED');
    expect((await m.api.disks.listDisks({ storageDomainId: dom.id })).disks.length).toBe(disksBefore);

    // The swap, on the data-mover of host2 (one job at a time): a slow copy holds the slot, the
    // import job is accepted (file inspected) and queued, the file is replaced, the slot frees.
    const mover = hostClient(pb.DataMoverServiceDefinition, 2, 'data-mover');
    const mt = hostClient(pb.MetadataTxServiceDefinition, 2, 'metadata-tx');
    try {
      const big = await m.createDisk(dom.id, 8 * MiB, 'swap-busy-src');
      writeRandom(path.join(dom.path, 'images', big.id, big.volumes[0]!.id), 0, 8);
      const newVolume = async (capacity: number) => {
        const [imageId, volumeId] = [randomUUID(), randomUUID()];
        await mt.createVolume(
          {
            domainPath: dom.path,
            imageId,
            volumeId,
            format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
            allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
            capacityBytes: capacity,
            initiallyIllegal: true,
          },
          T,
        );
        return { domainPath: dom.path, imageId, volumeId };
      };
      const busyDst = await newVolume(8 * MiB);
      const importDst = await newVolume(MiB);
      const file = path.join(importDir, 'swap.raw');
      fs.writeFileSync(file, Buffer.alloc(MiB, 0x22));
      const busy = await mover.copyVolume(
        { jobId: 'swap-busy', source: volumeRef(big), destination: busyDst, destinationGeneration: 0, rateLimitBytesPerSecond: 256 * 1024 },
        T,
      );
      const job = await mover.copyVolume({ jobId: 'swap-import', sourceFile: file, destination: importDst, destinationGeneration: 0 }, T);
      expect(job.status).toBe(pb.JobStatus.JOB_STATUS_QUEUED);
      const other = path.join(importDir, 'other.raw');
      fs.writeFileSync(other, Buffer.alloc(MiB, 0x33));
      fs.renameSync(other, file);
      await mover.abortJob({ jobId: busy.id }, T);
      let end: pb.Job;
      for (;;) {
        end = await mover.getJob({ jobId: job.id }, T);
        if ([pb.JobStatus.JOB_STATUS_DONE, pb.JobStatus.JOB_STATUS_FAILED, pb.JobStatus.JOB_STATUS_ABORTED].includes(end.status)) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      expect(end.status).toBe(pb.JobStatus.JOB_STATUS_FAILED);
      expect(end.error?.reason).toBe('SOURCE_CHANGED');
      // Nothing of either file reached the destination: still ILLEGAL, generation 0, no data.
      const v = await mt.getVolume({ ...importDst }, T);
      expect(v.volume?.legality).toBe(pb.Legality.LEGALITY_ILLEGAL);
      const data = fs.readFileSync(path.join(dom.path, 'images', importDst.imageId, importDst.volumeId));
      expect(data.includes(0x22) || data.includes(0x33)).toBe(false);
    } finally {
      mover.close();
      mt.close();
    }
  }, 180_000);

  test('domain paths: outside the roots, a root itself, inside a domain, above one (known or only on disk) → refused', async () => {
    const create = (requestId: string, p: string) => outcome(m.api.domains.createStorageDomain({ requestId, name: requestId, path: p }));
    expect((await create('out-of-roots', path.join(outside, 'dom'))).slice(0, 2)).toEqual(['PERMISSION_DENIED', 'DOMAIN_OUTSIDE_STORAGE_ROOTS']);
    expect((await create('the-root', m.mesh.storageDir)).slice(0, 2)).toEqual(['INVALID_ARGUMENT', 'DOMAIN_IS_STORAGE_ROOT']);
    expect((await create('inside', path.join(dom.path, 'images', 'nested'))).slice(0, 2)).toEqual(['INVALID_ARGUMENT', 'DOMAIN_INSIDE_DOMAIN']);
    expect((await create('above-known', path.join(m.mesh.storageDir, 'site'))).slice(0, 2)).toEqual(['INVALID_ARGUMENT', 'DOMAIN_CONTAINS_DOMAIN']);
    // A domain the scheduler does not know (made by hand below): the host's scan finds it.
    const hand = path.join(m.mesh.storageDir, 'hand', 'made', 'deep');
    fs.mkdirSync(path.join(hand, 'dom_md'), { recursive: true });
    fs.writeFileSync(path.join(hand, 'dom_md', 'metadata'), 'not ours');
    const above = await create('above-on-disk', path.join(m.mesh.storageDir, 'hand'));
    expect(above.slice(0, 2)).toEqual(['FAILED', 'DOMAIN_CONTAINS_DOMAIN']);
    // The host service refuses the same directly.
    const mt = hostClient(pb.MetadataTxServiceDefinition, 1, 'metadata-tx');
    try {
      const fmt = (p: string) => refusedWith(mt.formatDomain({ domainId: randomUUID(), name: 'x', path: p, ioTimeoutSeconds: 1 }, T));
      expect((await fmt(path.join(outside, 'dom'))).slice(0, 2)).toEqual(['PERMISSION_DENIED', 'DOMAIN_OUTSIDE_STORAGE_ROOTS']);
      expect((await fmt(path.join(dom.path, 'images', 'x'))).slice(0, 2)).toEqual(['INVALID_ARGUMENT', 'DOMAIN_INSIDE_DOMAIN']);
      fs.symlinkSync(outside, path.join(m.mesh.storageDir, 'link-out'));
      expect((await fmt(path.join(m.mesh.storageDir, 'link-out', 'dom'))).slice(0, 2)).toEqual(['FAILED_PRECONDITION', 'SYMLINK_REFUSED']); // one code per reason (reasons.ts)
    } finally {
      mt.close();
    }
    expect(fs.existsSync(path.join(outside, 'dom'))).toBe(false);
    expect(fs.existsSync(path.join(dom.path, 'images', 'nested'))).toBe(false);
  }, 120_000);

  test('a size beyond 2^53 over the public API: INVALID_ARGUMENT naming the field, the scheduler lives on', async () => {
    const varint = (v: bigint) => {
      const out: number[] = [];
      do {
        let b = Number(v & 0x7fn);
        v >>= 7n;
        if (v) b |= 0x80;
        out.push(b);
      } while (v);
      return out;
    };
    const bytes = [...pb.CreateDiskRequest.encode(pb.CreateDiskRequest.fromPartial({ requestId: 'huge', storageDomainId: dom.id })).finish()];
    const capacityField = 3; // CreateDiskRequest.capacity_bytes
    const raw = Buffer.from([...bytes, ...varint(BigInt((capacityField << 3) | 0)), ...varint(2n ** 60n)]);
    const r = await new Promise<{ code: number; details: string }>((resolve) =>
      m.api.disks.client.makeUnaryRequest(
        '/sdmesh.v1.DiskService/CreateDisk',
        (b: Buffer) => b,
        (b: Buffer) => b,
        raw,
        (err) => resolve({ code: err?.code ?? 0, details: err?.details ?? '' }),
      ),
    );
    expect(r.code).toBe(GrpcStatus.INVALID_ARGUMENT);
    expect(r.details).toMatch(/capacity_bytes 1152921504606846976 is out of range/);
  });

  test('every service is still alive and SERVING', async () => {
    for (const h of m.mesh.hosts) {
      for (const [name, s] of Object.entries(h.services)) {
        if (!s) continue;
        expect({ host: h.name, name, running: s.process.running() }).toEqual({ host: h.name, name, running: true });
        expect({ host: h.name, name, health: await checkHealth(s.grpcAddress, scheduler()) }).toEqual({ host: h.name, name, health: 'SERVING' });
      }
    }
    for (const r of m.replicas) expect(await checkHealth(r.grpcAddress, m.mesh.credentials())).toBe('SERVING');
  });
});
