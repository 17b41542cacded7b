import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createClient, csi, GrpcStatus, isMountPoint, SdmeshError, type ServiceClient } from '@sdmesh/common';
import { startProcess, waitFor, type ManagedProcess } from '@sdmesh/localmesh';
import { DataMoverMesh, MiB } from '../harness/data-mover-mesh';
import { REPO_ROOT } from '../harness/paths';

/**
 * The CSI node plugin against real parts: 2 hosts (sanlock daemons at io_timeout 1,
 * lease-managers, metadata-tx, data-movers), one node plugin process per host
 * (services/csi/dist/main.js --mode node), real qemu-storage-daemon, loop devices, mkfs, mounts.
 */
const Mode = csi.VolumeCapability_AccessMode_Mode;
type NodeClient = ServiceClient<typeof csi.NodeDefinition>;

const block = (mode = Mode.SINGLE_NODE_WRITER): csi.VolumeCapability => ({ accessType: { $case: 'block', block: {} }, accessMode: { mode } });
const mountCap = (fsType: string): csi.VolumeCapability => ({
  accessType: { $case: 'mount', mount: { fsType, mountFlags: [], volumeMountGroup: '' } },
  accessMode: { mode: Mode.SINGLE_NODE_WRITER },
});

interface Plugin {
  proc: ManagedProcess;
  client: NodeClient;
  stateDir: string;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('CSI node plugin on 2 hosts', () => {
  const mesh = new DataMoverMesh(2);
  let domain: { id: string; path: string };
  const plugins: Plugin[] = [];
  let work = '';

  const startPlugin = async (hostIdx: number): Promise<Plugin> => {
    const h = mesh.mesh.hosts[hostIdx - 1]!;
    const socket = path.join(work, `csi-${h.name}.sock`);
    const stateDir = path.join(work, `state-${h.name}`);
    let ready = false;
    const proc = startProcess(
      `csi-node@${h.name}`,
      process.execPath,
      [
        path.join(REPO_ROOT, 'services/csi/dist/main.js'),
        '--mode',
        'node',
        '--host-name',
        h.name,
        '--csi-endpoint',
        `unix://${socket}`,
        '--lease-manager-address',
        `unix:${mesh.mesh.leaseSocket(h.name)}`,
        '--state-dir',
        stateDir,
      ],
      {
        env: { ...process.env, ...h.sanlock.env, SDMESH_STORAGE_ROOTS: mesh.mesh.storageDir, SDMESH_INSECURE: 'true', SDMESH_LOG_LEVEL: 'info' },
        logFile: path.join(work, `csi-${h.name}.log`),
        onLine: (line) => {
          if (line.includes('"msg":"ready"')) ready = true;
        },
      },
    );
    await waitFor(`csi node plugin of ${h.name} ready`, () => (ready ? true : proc.running() ? undefined : Promise.reject(new Error('plugin exited'))), 60000);
    const client = createClient(csi.NodeDefinition, `unix:${socket}`, grpc.credentials.createInsecure());
    const p = { proc, client, stateDir };
    plugins[hostIdx - 1] = p;
    return p;
  };

  /** Undoes whatever a plugin recorded (loop devices only when still on our export file; mounts; daemons). */
  const cleanupState = (stateDir: string) => {
    const dir = path.join(stateDir, 'volumes');
    if (!fs.existsSync(dir)) return;
    for (const name of fs.readdirSync(dir).filter((n) => n.endsWith('.json'))) {
      const v = JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8')) as {
        published: Record<string, unknown>;
        stagingPath: string;
        loopDevice: string;
        exportFile: string;
        export: { pid: number };
      };
      for (const t of [...Object.keys(v.published), v.stagingPath]) while (isMountPoint(t)) spawnSync('umount', ['-l', t]);
      if (v.loopDevice) {
        const sys = `/sys/block/${path.basename(v.loopDevice)}/loop/backing_file`;
        const backing = fs.existsSync(sys) ? fs.readFileSync(sys, 'utf8').trim() : '';
        if (backing.startsWith(v.exportFile)) spawnSync('losetup', ['-d', v.loopDevice]);
      }
      try {
        process.kill(v.export.pid, 'SIGKILL');
      } catch {
        // gone
      }
      if (isMountPoint(v.exportFile)) spawnSync('umount', ['-l', v.exportFile]);
    }
  };

  beforeAll(async () => {
    await mesh.start();
    work = path.join(mesh.dir, 'csi');
    fs.mkdirSync(work, { recursive: true });
    domain = await mesh.formatDomain('csi');
    await startPlugin(1);
    await startPlugin(2);
  }, 240_000);

  afterAll(async () => {
    for (const p of plugins) {
      if (!p) continue;
      p.client.close();
      await p.proc.stop('SIGTERM', 10000);
      try {
        cleanupState(p.stateDir);
      } catch {
        // best effort: the next state dir
      }
    }
    await mesh.stop();
  }, 120_000);

  const node = (i: number) => plugins[i - 1]!.client;
  const volumeId = (imageId: string) => `${domain.id}/${imageId}`;
  const dirs = (name: string) => {
    const staging = path.join(work, name, 'staging');
    fs.mkdirSync(staging, { recursive: true });
    return { staging, target: path.join(work, name, 'target') };
  };
  const stagedRecord = (hostIdx: number, vid: string) =>
    fs
      .readdirSync(path.join(plugins[hostIdx - 1]!.stateDir, 'volumes'))
      .map(
        (n) =>
          JSON.parse(fs.readFileSync(path.join(plugins[hostIdx - 1]!.stateDir, 'volumes', n), 'utf8')) as {
            volumeId: string;
            loopDevice: string;
            export: { pid: number };
          },
      )
      .find((r) => r.volumeId === vid)!;
  const expectError = async (p: Promise<unknown>, code: GrpcStatus, reason?: string) => {
    const err = await p.then(
      () => undefined,
      (e: unknown) => SdmeshError.from(e),
    );
    expect(err).toBeInstanceOf(SdmeshError);
    expect(GrpcStatus[err!.code]).toBe(GrpcStatus[code]);
    if (reason) expect(err!.reason).toBe(reason);
    return err!;
  };

  it('reports itself: capabilities, node id and the domains it reaches as topology; refuses bad requests', async () => {
    const caps = await node(1).nodeGetCapabilities({});
    const types = caps.capabilities.map((c) => c.type!.rpc.type);
    expect(types).toEqual(
      expect.arrayContaining([
        csi.NodeServiceCapability_RPC_Type.STAGE_UNSTAGE_VOLUME,
        csi.NodeServiceCapability_RPC_Type.EXPAND_VOLUME,
        csi.NodeServiceCapability_RPC_Type.GET_VOLUME_STATS,
        csi.NodeServiceCapability_RPC_Type.VOLUME_CONDITION,
      ]),
    );
    const info = await node(1).nodeGetInfo({});
    expect(info.nodeId).toBe('host1');
    expect(info.accessibleTopology!.segments).toEqual({ [`topology.csi.sdmesh.io/domain-${domain.id}`]: 'true' });
    const { staging } = dirs('bad');
    await expectError(
      node(1).nodeStageVolume({ volumeId: '', stagingTargetPath: staging, volumeCapability: block(), publishContext: {}, secrets: {}, volumeContext: {} }),
      GrpcStatus.INVALID_ARGUMENT,
    );
    await expectError(
      node(1).nodeStageVolume({ volumeId: 'x', stagingTargetPath: staging, volumeCapability: undefined, publishContext: {}, secrets: {}, volumeContext: {} }),
      GrpcStatus.INVALID_ARGUMENT,
    );
    await expectError(
      node(1).nodeStageVolume({
        volumeId: 'no-such-volume',
        stagingTargetPath: staging,
        volumeCapability: block(),
        publishContext: {},
        secrets: {},
        volumeContext: {},
      }),
      GrpcStatus.NOT_FOUND,
    );
    await expectError(
      node(1).nodeGetVolumeStats({ volumeId: volumeId('00000000-0000-4000-8000-000000000000'), volumePath: staging, stagingTargetPath: '' }),
      GrpcStatus.NOT_FOUND,
    );
    await expectError(
      node(1).nodeGetVolumeStats({ volumeId: volumeId('00000000-0000-4000-8000-000000000000'), volumePath: 'some/path', stagingTargetPath: '' }),
      GrpcStatus.NOT_FOUND,
    );
    await expectError(node(1).nodeGetVolumeStats({ volumeId: 'x', volumePath: '', stagingTargetPath: '' }), GrpcStatus.INVALID_ARGUMENT);
    await expectError(
      node(1).nodePublishVolume({
        volumeId: volumeId('00000000-0000-4000-8000-000000000000'),
        stagingTargetPath: staging,
        targetPath: path.join(staging, 't'),
        volumeCapability: block(),
        readonly: false,
        publishContext: {},
        secrets: {},
        volumeContext: {},
      }),
      GrpcStatus.FAILED_PRECONDITION,
      'NOT_STAGED',
    );
    // An unpublish of what this plugin did not publish touches nothing there.
    const bystander = path.join(work, 'bystander.txt');
    fs.writeFileSync(bystander, "not the plugin's");
    await node(1).nodeUnpublishVolume({ volumeId: volumeId('00000000-0000-4000-8000-000000000000'), targetPath: bystander });
    await node(1).nodeUnpublishVolume({ volumeId: 'no-such-volume', targetPath: bystander });
    expect(fs.readFileSync(bystander, 'utf8')).toBe("not the plugin's");
  }, 60_000);

  /** Stage + publish (block) on a host; returns the published device file. */
  const attachBlock = async (hostIdx: number, vid: string, name: string, mode = Mode.SINGLE_NODE_WRITER) => {
    const { staging, target } = dirs(name);
    const req = { volumeId: vid, stagingTargetPath: staging, volumeCapability: block(mode), publishContext: {}, secrets: {}, volumeContext: {} };
    await node(hostIdx).nodeStageVolume(req, { timeoutMs: 120_000 });
    await node(hostIdx).nodeStageVolume(req, { timeoutMs: 120_000 }); // idempotent
    const pub = { ...req, targetPath: target, readonly: false };
    await node(hostIdx).nodePublishVolume(pub);
    await node(hostIdx).nodePublishVolume(pub);
    return { staging, target };
  };
  const detach = async (hostIdx: number, vid: string, d: { staging: string; target: string }) => {
    await node(hostIdx).nodeUnpublishVolume({ volumeId: vid, targetPath: d.target });
    await node(hostIdx).nodeUnpublishVolume({ volumeId: vid, targetPath: d.target });
    await node(hostIdx).nodeUnstageVolume({ volumeId: vid, stagingTargetPath: d.staging }, { timeoutMs: 60_000 });
    await node(hostIdx).nodeUnstageVolume({ volumeId: vid, stagingTargetPath: d.staging });
  };

  it('block mode end to end: a raw disk and a qcow2 chain take 256 MiB through the device; the checksum after unstage matches', async () => {
    const data = randomBytes(256 * MiB);
    const src = path.join(work, 'data.bin');
    fs.writeFileSync(src, data);
    const raw = await mesh.createVolume(domain, { format: 'RAW', capacity: 256 * MiB });
    const base = await mesh.createVolume(domain, { format: 'QCOW2', capacity: 256 * MiB });
    const top = await mesh.createSnapshot(base.ref);
    for (const [name, ref] of [
      ['raw', raw.ref],
      ['qcow2', top.ref],
    ] as const) {
      const vid = volumeId(ref.imageId);
      const d = await attachBlock(1, vid, `e2e-${name}`);
      expect(fs.statSync(d.target).isBlockDevice()).toBe(true);
      const stats = await node(1).nodeGetVolumeStats({ volumeId: vid, volumePath: d.target, stagingTargetPath: d.staging });
      expect(stats.volumeCondition).toEqual({ abnormal: false, message: 'healthy' });
      expect(stats.usage[0]!.total).toBe(256 * MiB);
      // The daemon holds the leaf's lease exclusively, in sanlock's own table.
      const rec = stagedRecord(1, vid);
      const held = (await mesh.host(1).leases.listHeldLeases({ holderPid: rec.export.pid })).leases.map((l) => l.location!.resource);
      expect(held).toContain(ref.volumeId);
      execFileSync('dd', [`if=${src}`, `of=${d.target}`, 'bs=4M', 'oflag=direct', 'status=none']);
      await detach(1, vid, d);
      expect(fs.readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(d.target);
      expect(fs.existsSync(`/sys/block/${path.basename(rec.loopDevice)}/loop/backing_file`)).toBe(false);
      const sum = await mesh.host(1).mover.checksumVolume({ volume: ref }, { timeoutMs: 120_000 });
      expect(sum.checksum).toBe(sha256(data));
    }
    fs.rmSync(src);
  }, 400_000);

  /** ext4's online grow (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which this sandbox's root lacks (a privileged pod has it). */
  const canGrowExt4Online = (BigInt('0x' + /^CapEff:\s+([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]) >> 24n) & 1n;

  it('file systems: format on first stage only, publish, files kept across unstage/restage, online grow; block grows online too', async () => {
    for (const fsType of ['ext4', 'xfs']) {
      const v = await mesh.createVolume(domain, { format: 'RAW', capacity: 320 * MiB });
      const vid = volumeId(v.ref.imageId);
      const { staging, target } = dirs(`fs-${fsType}`);
      const stage = { volumeId: vid, stagingTargetPath: staging, volumeCapability: mountCap(fsType), publishContext: {}, secrets: {}, volumeContext: {} };
      const publish = { ...stage, targetPath: target, readonly: false };
      await node(1).nodeStageVolume(stage, { timeoutMs: 120_000 });
      await node(1).nodePublishVolume(publish);
      fs.writeFileSync(path.join(target, 'kept.txt'), `still here on ${fsType}`);
      await node(1).nodeUnpublishVolume({ volumeId: vid, targetPath: target });
      await node(1).nodeUnstageVolume({ volumeId: vid, stagingTargetPath: staging }, { timeoutMs: 60_000 });
      expect(fs.existsSync(target)).toBe(false);
      // Restaged: the same file system (never re-formatted), the file is there.
      await node(1).nodeStageVolume(stage, { timeoutMs: 120_000 });
      await node(1).nodePublishVolume(publish);
      expect(fs.readFileSync(path.join(target, 'kept.txt'), 'utf8')).toBe(`still here on ${fsType}`);
      if (fsType === 'xfs') {
        // A restarted plugin finds its storage daemon, loop device and mounts in its state dir.
        plugins[0]!.client.close();
        await plugins[0]!.proc.stop('SIGTERM', 10000);
        expect(isMountPoint(target)).toBe(true);
        await startPlugin(1);
      }
      const before = await node(1).nodeGetVolumeStats({ volumeId: vid, volumePath: target, stagingTargetPath: staging });
      expect(before.usage.map((u) => u.unit)).toEqual([csi.VolumeUsage_Unit.BYTES, csi.VolumeUsage_Unit.INODES]);
      expect(before.usage[1]!.total).toBeGreaterThan(0);
      if (fsType === 'xfs' || canGrowExt4Online) {
        const grown = await node(1).nodeExpandVolume(
          {
            volumeId: vid,
            volumePath: target,
            stagingTargetPath: staging,
            capacityRange: { requiredBytes: 512 * MiB, limitBytes: 0 },
            volumeCapability: undefined,
            secrets: {},
          },
          { timeoutMs: 120_000 },
        );
        expect(grown.capacityBytes).toBe(512 * MiB);
        const after = await node(1).nodeGetVolumeStats({ volumeId: vid, volumePath: target, stagingTargetPath: staging });
        expect(after.usage[0]!.total).toBeGreaterThan(before.usage[0]!.total + 150 * MiB);
        expect(fs.readFileSync(path.join(target, 'kept.txt'), 'utf8')).toBe(`still here on ${fsType}`);
      }
      await node(1).nodeUnpublishVolume({ volumeId: vid, targetPath: target });
      await node(1).nodeUnstageVolume({ volumeId: vid, stagingTargetPath: staging }, { timeoutMs: 60_000 });
    }

    // Block: the device grows while published.
    const b = await mesh.createVolume(domain, { format: 'QCOW2', capacity: 64 * MiB });
    const bid = volumeId(b.ref.imageId);
    const d = await attachBlock(1, bid, 'grow-block');
    const r = await node(1).nodeExpandVolume(
      {
        volumeId: bid,
        volumePath: d.target,
        stagingTargetPath: d.staging,
        capacityRange: { requiredBytes: 96 * MiB, limitBytes: 0 },
        volumeCapability: undefined,
        secrets: {},
      },
      { timeoutMs: 120_000 },
    );
    expect(r.capacityBytes).toBe(96 * MiB);
    expect(Number(execFileSync('blockdev', ['--getsize64', d.target], { encoding: 'utf8' }).trim())).toBe(96 * MiB);
    // A size that is not whole sectors is rounded up to the next 512 bytes; past limit_bytes once rounded: OUT_OF_RANGE.
    const grow = (requiredBytes: number, limitBytes = 0) =>
      node(1).nodeExpandVolume(
        {
          volumeId: bid,
          volumePath: d.target,
          stagingTargetPath: d.staging,
          capacityRange: { requiredBytes, limitBytes },
          volumeCapability: undefined,
          secrets: {},
        },
        { timeoutMs: 120_000 },
      );
    await expectError(grow(96 * MiB + 1, 96 * MiB + 100), GrpcStatus.OUT_OF_RANGE);
    expect((await grow(96 * MiB + 1)).capacityBytes).toBe(96 * MiB + 512);
    expect(Number(execFileSync('blockdev', ['--getsize64', d.target], { encoding: 'utf8' }).trim())).toBe(96 * MiB + 512);
    await detach(1, bid, d);

    // Staged read-only (a shared lease, a read-only export): refused FAILED_PRECONDITION, the size unchanged.
    const ro = await mesh.createVolume(domain, { format: 'RAW', capacity: 64 * MiB });
    const roId = volumeId(ro.ref.imageId);
    const rod = await attachBlock(1, roId, 'grow-read-only', Mode.SINGLE_NODE_READER_ONLY);
    const refused = await expectError(
      node(1).nodeExpandVolume(
        {
          volumeId: roId,
          volumePath: rod.target,
          stagingTargetPath: rod.staging,
          capacityRange: { requiredBytes: 96 * MiB, limitBytes: 0 },
          volumeCapability: undefined,
          secrets: {},
        },
        { timeoutMs: 120_000 },
      ),
      GrpcStatus.FAILED_PRECONDITION,
    );
    expect(refused.message).toMatch(/read-only/);
    expect(Number(execFileSync('blockdev', ['--getsize64', rod.target], { encoding: 'utf8' }).trim())).toBe(64 * MiB);
    expect(fs.statSync(ro.path).size).toBe(64 * MiB);
    await detach(1, roId, rod);
  }, 300_000);

  it("MULTI_NODE_MULTI_WRITER block (live migration): both hosts stage it with a shared lease and see each other's writes", async () => {
    const v = await mesh.createVolume(domain, { format: 'RAW', capacity: 64 * MiB });
    const vid = volumeId(v.ref.imageId);
    const d1 = await attachBlock(1, vid, 'rwx-h1', Mode.MULTI_NODE_MULTI_WRITER);
    const d2 = await attachBlock(2, vid, 'rwx-h2', Mode.MULTI_NODE_MULTI_WRITER);
    const owner = await mesh.host(1).leases.getLeaseOwner({ lease: v.lease! });
    expect([...owner.ownerHostIds].sort()).toEqual([1, 2]);
    const block4k = randomBytes(4096);
    const src = path.join(work, 'rwx.bin');
    fs.writeFileSync(src, block4k);
    execFileSync('dd', [`if=${src}`, `of=${d1.target}`, 'bs=4k', 'seek=100', 'oflag=direct', 'status=none']);
    const seen = execFileSync('dd', [`if=${d2.target}`, 'bs=4k', 'skip=100', 'count=1', 'iflag=direct', 'status=none']);
    expect(sha256(seen)).toBe(sha256(block4k));
    // A publish never lands elsewhere through a symbolic link.
    const elsewhere = path.join(work, 'rwx-elsewhere');
    fs.writeFileSync(elsewhere, 'kept');
    const linked = path.join(work, 'rwx-link');
    fs.symlinkSync(elsewhere, linked);
    await expectError(
      node(1).nodePublishVolume({
        volumeId: vid,
        stagingTargetPath: d1.staging,
        targetPath: linked,
        volumeCapability: block(Mode.MULTI_NODE_MULTI_WRITER),
        readonly: false,
        publishContext: {},
        secrets: {},
        volumeContext: {},
      }),
      GrpcStatus.INVALID_ARGUMENT,
    );
    expect(isMountPoint(elsewhere)).toBe(false);
    fs.rmSync(linked);
    fs.rmSync(elsewhere);
    await detach(1, vid, d1);
    await detach(2, vid, d2);
    fs.rmSync(src);
    // Two hosts writing one qcow2 would each allocate clusters on their own: refused.
    const q = await mesh.createVolume(domain, { format: 'QCOW2', capacity: 64 * MiB });
    const { staging } = dirs('rwx-qcow2');
    await expectError(
      node(1).nodeStageVolume({
        volumeId: volumeId(q.ref.imageId),
        stagingTargetPath: staging,
        volumeCapability: block(Mode.MULTI_NODE_MULTI_WRITER),
        publishContext: {},
        secrets: {},
        volumeContext: {},
      }),
      GrpcStatus.FAILED_PRECONDITION,
      'UNSUPPORTED_IMAGE',
    );
  }, 120_000);

  it('fencing: exclusive elsewhere is refused; SIGKILL of host1 sanlock → EIO on host1; once host1 is dead host2 attaches and finds the data', async () => {
    const v = await mesh.createVolume(domain, { format: 'RAW', capacity: 64 * MiB });
    const vid = volumeId(v.ref.imageId);
    const d1 = await attachBlock(1, vid, 'fence-h1');
    const data = randomBytes(16 * MiB);
    const src = path.join(work, 'fence.bin');
    fs.writeFileSync(src, data);
    execFileSync('dd', [`if=${src}`, `of=${d1.target}`, 'bs=1M', 'oflag=direct', 'status=none']);

    const { staging: s2, target: t2 } = dirs('fence-h2');
    const stage2 = { volumeId: vid, stagingTargetPath: s2, volumeCapability: block(), publishContext: {}, secrets: {}, volumeContext: {} };
    await expectError(node(2).nodeStageVolume(stage2, { timeoutMs: 120_000 }), GrpcStatus.FAILED_PRECONDITION, 'STAGED_ELSEWHERE');
    expect(fs.readdirSync(path.join(plugins[1]!.stateDir, 'volumes'))).toEqual([]);

    const pid = stagedRecord(1, vid).export.pid;
    process.kill(mesh.mesh.hosts[0]!.sanlock.pid, 'SIGKILL');
    await waitFor('host1 storage daemon fenced', () => (fs.existsSync(`/proc/${pid}`) ? undefined : true), 30000);
    const w = spawnSync('dd', ['if=/dev/zero', `of=${d1.target}`, 'bs=4k', 'count=1', 'oflag=direct'], { encoding: 'utf8' });
    expect(w.status).not.toBe(0);
    expect(w.stderr).toMatch(/Input\/output error/);
    const fencedStats = await node(1).nodeGetVolumeStats({ volumeId: vid, volumePath: d1.target, stagingTargetPath: d1.staging });
    expect(fencedStats.volumeCondition!.abnormal).toBe(true);
    expect(fencedStats.volumeCondition!.message).toMatch(/lease was lost/);

    // host2 can take the lease only once sanlock says host1 is dead (~70 s at io_timeout 1).
    await waitFor(
      'host2 stages the volume after host1 is dead',
      async () =>
        node(2)
          .nodeStageVolume(stage2, { timeoutMs: 120_000 })
          .then(
            () => true,
            (e: unknown) => (SdmeshError.from(e).reason === 'STAGED_ELSEWHERE' ? undefined : Promise.reject(e)),
          ),
      180_000,
      3000,
    );
    await node(2).nodePublishVolume({ ...stage2, targetPath: t2, readonly: false });
    const back = Buffer.alloc(16 * MiB);
    const fd = fs.openSync(t2, 'r');
    fs.readSync(fd, back, 0, back.length, 0);
    fs.closeSync(fd);
    expect(sha256(back)).toBe(sha256(data));
    await node(2).nodeUnpublishVolume({ volumeId: vid, targetPath: t2 });
    await node(2).nodeUnstageVolume({ volumeId: vid, stagingTargetPath: s2 }, { timeoutMs: 60_000 });
  }, 400_000);
});
