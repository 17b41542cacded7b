import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createClient, csi, pb } from '@sdmesh/common';
import { startProcess, waitFor } from '@sdmesh/localmesh';
import { printColumns, runBench, startApiMesh } from './lib';

/**
 * Block I/O through a staged sdmesh disk (CSI node plugin: qemu-storage-daemon FUSE export with
 * the disk's lease, direct-io loop device, published onto a file) vs the same fio job on a bare
 * raw image file on the same file system, in one run.
 *
 * usage: csi-block-io [size MiB = 512] [seconds per job = 10]
 */
const [sizeMiB = 512, seconds = 10] = process.argv.slice(2).map(Number);
const MiB = 1024 * 1024;

interface FioResult {
  jobs: Array<{ read: { bw_bytes: number; iops: number }; write: { bw_bytes: number; iops: number } }>;
}

/** One fio job (O_DIRECT, libaio, queue depth 16) on a file or device; MB/s and IOPS. */
function fio(target: string, rw: string, bs: string): { mbps: number; iops: number } {
  const out = execFileSync(
    'fio',
    [
      '--name=bench',
      `--filename=${target}`,
      `--rw=${rw}`,
      `--bs=${bs}`,
      '--direct=1',
      '--ioengine=libaio',
      '--iodepth=16',
      `--size=${sizeMiB}M`,
      '--time_based',
      `--runtime=${seconds}`,
      '--randrepeat=0',
      '--output-format=json',
    ],
    { encoding: 'utf8', maxBuffer: 16 * MiB },
  );
  const job = (JSON.parse(out.slice(out.indexOf('{'))) as FioResult).jobs[0]!;
  const side = rw.includes('write') ? job.write : job.read;
  return { mbps: side.bw_bytes / MiB, iops: side.iops };
}

async function main(): Promise<void> {
  const api = await startApiMesh('csi-block-io', 1);
  const host = api.mesh.hosts[0]!;
  const work = path.join(api.dir, 'csi');
  fs.mkdirSync(path.join(work, 'staging'), { recursive: true });
  const socket = path.join(work, 'node.sock');
  let ready = false;
  const plugin = startProcess(
    'csi-node',
    process.execPath,
    [
      path.join(__dirname, '../../services/csi/dist/main.js'),
      '--mode',
      'node',
      '--host-name',
      host.name,
      '--csi-endpoint',
      `unix://${socket}`,
      '--lease-manager-address',
      `unix:${api.mesh.leaseSocket(host.name)}`,
      '--state-dir',
      path.join(work, 'state'),
    ],
    {
      env: { ...process.env, ...host.sanlock.env, SDMESH_STORAGE_ROOTS: api.mesh.storageDir, SDMESH_INSECURE: 'true', SDMESH_LOG_LEVEL: 'warn' },
      logFile: path.join(work, 'node.log'),
      onLine: (line) => {
        if (line.includes('"msg":"ready"')) ready = true;
      },
    },
  );
  const node = createClient(csi.NodeDefinition, `unix:${socket}`, grpc.credentials.createInsecure());
  const staging = path.join(work, 'staging');
  const target = path.join(work, 'device');
  let volumeId = '';
  const bare = path.join(api.mesh.storageDir, 'bare.img');
  try {
    await waitFor('node plugin ready', () => (ready ? true : undefined), 60_000);
    const domainId = await api.createDomain('bench');
    const op = await api.finish(
      api.disks.createDisk({
        requestId: 'bench-csi-disk',
        storageDomainId: domainId,
        capacityBytes: sizeMiB * MiB,
        format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
        allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED,
        description: 'csi block io bench',
        waitForLocks: false,
      }),
    );
    const disk = op.result?.$case === 'disk' ? op.result.disk : undefined;
    if (!disk) throw new Error('CreateDisk returned no disk');
    volumeId = `${domainId}/${disk.id}`;
    const cap: csi.VolumeCapability = {
      accessType: { $case: 'block', block: {} },
      accessMode: { mode: csi.VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
    };
    await node.nodeStageVolume(
      { volumeId, stagingTargetPath: staging, volumeCapability: cap, publishContext: {}, secrets: {}, volumeContext: {} },
      { timeoutMs: 120_000 },
    );
    await node.nodePublishVolume({
      volumeId,
      stagingTargetPath: staging,
      targetPath: target,
      volumeCapability: cap,
      readonly: false,
      publishContext: {},
      secrets: {},
      volumeContext: {},
    });
    // The baseline: a fully allocated raw file of the same size beside the domain, as the disk's file is.
    execFileSync('fallocate', ['-l', `${sizeMiB}M`, bare]);
    console.log(`fio, O_DIRECT, libaio, iodepth 16, ${sizeMiB} MiB, ${seconds} s per job; preallocated raw disk staged (block) vs bare raw file`);
    const rows: string[][] = [];
    for (const [label, rw, bs] of [
      ['sequential write 1 MiB', 'write', '1M'],
      ['sequential read 1 MiB', 'read', '1M'],
      ['random write 4 KiB', 'randwrite', '4k'],
      ['random read 4 KiB', 'randread', '4k'],
    ] as const) {
      // Alternate which goes first, so neither always runs on a warmer disk.
      const first = rows.length % 2 === 0;
      const a = first ? fio(target, rw, bs) : undefined;
      const b = fio(bare, rw, bs);
      const staged = a ?? fio(target, rw, bs);
      const unit = bs === '4k' ? 'IOPS' : 'MB/s';
      const s = bs === '4k' ? staged.iops : staged.mbps;
      const base = bs === '4k' ? b.iops : b.mbps;
      rows.push([label, `${s.toFixed(0)} ${unit}`, `${base.toFixed(0)} ${unit}`, (s / base).toFixed(2)]);
    }
    printColumns(['job', 'staged sdmesh disk', 'bare image file', 'ratio'], rows);
  } finally {
    if (volumeId) {
      await node.nodeUnpublishVolume({ volumeId, targetPath: target }).catch((e: unknown) => console.error('unpublish', e));
      await node.nodeUnstageVolume({ volumeId, stagingTargetPath: staging }, { timeoutMs: 60_000 }).catch((e: unknown) => console.error('unstage', e));
    }
    node.close();
    await plugin.stop('SIGTERM', 10_000);
    fs.rmSync(bare, { force: true });
    await api.stop();
  }
}

runBench(main);
