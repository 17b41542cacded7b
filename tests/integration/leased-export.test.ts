import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createLogger, failedPrecondition, isMountPoint, LeasedExport, pb, processRunning, SdmeshError } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { DataMoverMesh, MiB } from '../harness/data-mover-mesh';

/**
 * LeasedExport against real parts: a sanlock daemon and lease-manager (one host), a real
 * qemu-storage-daemon exporting a volume through FUSE and NBD. The daemon itself is the lease
 * holder: sanlock names its pid, and its exit frees the lease.
 */
describe('leased qemu-storage-daemon export', () => {
  const mesh = new DataMoverMesh(1, {}, ['lease-manager', 'metadata-tx']);
  const log = createLogger('leased-export-test', 'warn');
  let domain: { id: string; path: string };
  const running: LeasedExport[] = [];

  beforeAll(async () => {
    await mesh.start();
    domain = await mesh.formatDomain('exports');
    await mesh.host(1).leases.joinLockspace({ lockspace: domain.id, path: path.join(domain.path, 'dom_md', 'ids'), wait: true }, { timeoutMs: 60000 });
  }, 180_000);

  afterAll(async () => {
    for (const e of running) await e.stop().catch(() => undefined);
    await mesh.stop();
  }, 60_000);

  const volumeFiles = async (format: 'RAW' | 'QCOW2') => {
    const v = await mesh.createVolume(domain, { format, capacity: 64 * MiB });
    const file = path.join(domain.path, 'images', v.ref.imageId, v.ref.volumeId);
    return { v, file, location: v.lease! };
  };

  const heldBy = async (pid: number) => (await mesh.host(1).leases.listHeldLeases({ holderPid: pid })).leases.map((l) => l.location!.resource);

  it('exports a raw volume through FUSE holding its lease as its own pid; its exit frees the lease', async () => {
    const { v, file, location } = await volumeFiles('RAW');
    const runDir = path.join(mesh.dir, 'exports');
    const mountpoint = path.join(runDir, 'raw.img');
    const fd = fs.openSync(file, 'r+');
    let checked = false;
    const exp = await LeasedExport.start({
      id: 'raw',
      runDir,
      layers: [{ file: fd, format: 'RAW' }],
      writable: true,
      target: { type: 'fuse', mountpoint },
      leases: [{ location, mode: 'exclusive' }],
      leaseManager: mesh.host(1).leases,
      operationId: 'test-export',
      underLeases: async () => {
        checked = true;
      },
      env: mesh.mesh.hosts[0]!.sanlock.env,
      log,
    }).finally(() => fs.closeSync(fd));
    running.push(exp);
    expect(checked).toBe(true);
    expect(await heldBy(exp.pid)).toEqual([v.ref.volumeId]);
    expect(fs.readFileSync(`/proc/${exp.pid}/cmdline`, 'utf8')).toContain('qemu-storage-daemon');
    expect(isMountPoint(mountpoint)).toBe(true);
    expect(fs.statSync(mountpoint).size).toBe(64 * MiB);
    expect(await exp.size()).toBe(64 * MiB);

    // A write through the export lands in the volume's file.
    const block = Buffer.alloc(MiB, 0x5a);
    const w = fs.openSync(mountpoint, 'r+');
    fs.writeSync(w, block, 0, block.length, 3 * MiB);
    fs.fsyncSync(w);
    fs.closeSync(w);
    const r = fs.openSync(file, 'r');
    const back = Buffer.alloc(MiB);
    fs.readSync(r, back, 0, MiB, 3 * MiB);
    fs.closeSync(r);
    expect(back.equals(block)).toBe(true);

    // Another holder on this host is refused while the daemon holds it.
    const err = await mesh
      .host(1)
      .leases.acquireLease({ lease: location, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: 0, operationId: 'intruder', wait: false })
      .catch((e: unknown) => SdmeshError.from(e));
    expect(err).toBeInstanceOf(SdmeshError);

    await exp.resize(96 * MiB);
    expect(await exp.size()).toBe(96 * MiB);

    await exp.stop();
    expect(processRunning(exp.pid)).toBe(false);
    expect(isMountPoint(mountpoint)).toBe(false);
    await waitFor('lease released', async () => ((await heldBy(exp.pid)).length === 0 ? true : undefined), 30000, 100);
  }, 120_000);

  it('exports a qcow2 chain read-only over NBD; a failed check under the leases stops the daemon and frees them', async () => {
    const base = await volumeFiles('RAW');
    const top = await mesh.createSnapshot(base.v.ref);
    const topFile = path.join(domain.path, 'images', top.ref.imageId, top.ref.volumeId);
    const runDir = path.join(mesh.dir, 'exports');
    const socketPath = path.join(runDir, 'chain.nbd');
    const fds = [fs.openSync(topFile, 'r'), fs.openSync(base.file, 'r')];
    const leases = [
      { location: top.lease!, mode: 'shared' as const },
      { location: base.location, mode: 'shared' as const },
    ];
    const common = {
      runDir,
      layers: [
        { file: fds[0]!, format: 'QCOW2' as const },
        { file: fds[1]!, format: 'RAW' as const },
      ],
      writable: false,
      leases,
      leaseManager: mesh.host(1).leases,
      operationId: 'test-export',
      env: mesh.mesh.hosts[0]!.sanlock.env,
      log,
    };
    try {
      let failedPid = 0;
      const refused = await LeasedExport.start({
        ...common,
        id: 'refused',
        target: { type: 'nbd', socketPath: path.join(runDir, 'refused.nbd'), name: 'disk' },
        underLeases: async () => {
          failedPid = (await mesh.host(1).leases.listHeldLeases({})).leases.find((l) => l.location!.resource === top.ref.volumeId)!.holderPid;
          throw failedPrecondition('generation moved', 'GENERATION_MISMATCH');
        },
      }).catch((e: unknown) => SdmeshError.from(e));
      expect(refused).toMatchObject({ reason: 'GENERATION_MISMATCH' });
      expect(processRunning(failedPid)).toBe(false);
      await waitFor('leases of the refused export freed', async () => ((await heldBy(failedPid)).length === 0 ? true : undefined), 30000, 100);

      const exp = await LeasedExport.start({ ...common, id: 'chain', target: { type: 'nbd', socketPath, name: 'disk' } });
      running.push(exp);
      expect((await heldBy(exp.pid)).sort()).toEqual([base.v.ref.volumeId, top.ref.volumeId].sort());
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', `nbd+unix:///disk?socket=${socketPath}`], { encoding: 'utf8' })) as {
        'virtual-size': number;
      };
      expect(info['virtual-size']).toBe(64 * MiB);
      // Read-only: a write through the export is refused.
      expect(() =>
        execFileSync('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', `nbd+unix:///disk?socket=${socketPath}`], { stdio: 'pipe', encoding: 'utf8' }),
      ).toThrow();
      await exp.stop();
    } finally {
      for (const fd of fds) fs.closeSync(fd);
    }
  }, 120_000);
  it('the host loses the lockspace: sanlock kills the daemon, its FUSE export stops serving', async () => {
    const lost = await mesh.formatDomain('lost');
    const idsPath = path.join(lost.path, 'dom_md', 'ids');
    await mesh.host(1).leases.joinLockspace({ lockspace: lost.id, path: idsPath, wait: true }, { timeoutMs: 60000 });
    const v = await mesh.createVolume(lost, { format: 'RAW', capacity: 16 * MiB });
    const fd = fs.openSync(path.join(lost.path, 'images', v.ref.imageId, v.ref.volumeId), 'r+');
    const mountpoint = path.join(mesh.dir, 'exports', 'lost.img');
    const exp = await LeasedExport.start({
      id: 'lost',
      runDir: path.join(mesh.dir, 'exports'),
      layers: [{ file: fd, format: 'RAW' }],
      writable: true,
      target: { type: 'fuse', mountpoint },
      leases: [{ location: v.lease!, mode: 'exclusive' }],
      leaseManager: mesh.host(1).leases,
      operationId: 'test-export',
      env: mesh.mesh.hosts[0]!.sanlock.env,
      log,
    }).finally(() => fs.closeSync(fd));
    running.push(exp);
    fs.truncateSync(idsPath, 0); // renewals fail: the storage "went away" for this lockspace
    // sanlock acts after 8 × io_timeout (1 s here) without a renewal.
    await waitFor('storage daemon killed by sanlock', () => (exp.running() ? undefined : true), 60000, 200);
    // Gone either way: unmounted by the daemon's own exit (SIGTERM), or a dead FUSE mount (SIGKILL).
    let served: Buffer | undefined;
    try {
      served = fs.readFileSync(mountpoint);
    } catch {
      served = undefined;
    }
    expect(served?.length ?? 0).toBe(0);
    await exp.stop();
    expect(isMountPoint(mountpoint)).toBe(false);
  }, 180_000);
});
