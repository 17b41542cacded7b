/**
 * Image transfer throughput vs qemu-img convert, in one run on one mesh (1 sanlock host:
 * lease-manager, metadata-tx, data-mover; one SDM scheduler; mTLS): a local sparse raw image of
 * capacityMiB holding dataMiB of random data in 4 runs, then `rounds` times, alternating:
 *
 *   upload    sdmesh: StartImageTransfer → READY → sparse PUTs over HTTPS (sdmctl's client) → Finalize DONE
 *             baseline: qemu-img convert -n -t none of the same image onto a raw file in the domain
 *   download  sdmesh: StartImageTransfer (download) → READY → GETs of the data extents → a local sparse raw → Finalize DONE
 *             baseline: qemu-img convert -T none of that volume's file into a local raw file
 *
 * MB/s = allocated data (10^6 bytes) / seconds; sdmesh is timed twice: the whole operation, and the
 * data phase alone (what the HTTPS endpoint moved).
 *
 *   npm run bench -- image-transfer [rounds=3] [capacityMiB=2048] [dataMiB=512]
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { download, TransferEndpoint, upload, type TransferResult } from '@sdmesh/sdmctl';
import { printColumns, runBench, startApiMesh } from './lib';

const MiB = 1024 * 1024;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 3);
  const capacityMiB = Number(process.argv[3] ?? 2048);
  const dataMiB = Number(process.argv[4] ?? 512);
  const api = await startApiMesh('transfer', 1);
  const transfers = createClient(pb.ImageTransferServiceDefinition, api.schedulerAddress, api.mesh.credentials());
  const env = api.mesh.tlsEnv({ kind: 'user', name: 'admin' });
  const tls = { ca: env.SDMESH_TLS_CA!, cert: env.SDMESH_TLS_CERT!, key: env.SDMESH_TLS_KEY! };
  try {
    const domainId = await api.createDomain('bench');
    const domainPath = path.join(api.mesh.storageDir, 'bench');
    const work = path.join(api.dir, 'local');
    fs.mkdirSync(work);
    const source = path.join(work, 'source.raw');
    fs.writeFileSync(source, '');
    fs.truncateSync(source, capacityMiB * MiB);
    const run = Math.floor(dataMiB / 4);
    for (let i = 0; i < 4; i++) {
      const seek = Math.floor(((capacityMiB - run) * i) / 4);
      execFileSync('dd', ['if=/dev/urandom', `of=${source}`, 'bs=1M', `count=${run}`, `seek=${seek}`, 'conv=notrunc', 'status=none']);
    }
    const dataBytes = 4 * run * MiB;
    const diskOp = await api.finish(api.disks.createDisk({ requestId: 'bench-disk', storageDomainId: domainId, capacityBytes: capacityMiB * MiB }));
    if (diskOp.result?.$case !== 'disk') throw new Error('no disk');
    const disk = diskOp.result.disk;
    const volumeFile = path.join(domainPath, 'images', disk.id, disk.volumes[0]!.id);

    const transfer = async (direction: 'upload' | 'download', i: number, move: (e: TransferEndpoint) => Promise<TransferResult>) => {
      const t0 = performance.now();
      const op = await transfers.startImageTransfer({
        requestId: `bench-${direction}-${i}`,
        storageDomainId: domainId,
        diskId: disk.id,
        direction: direction === 'upload' ? pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD : pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD,
        format: pb.TransferFormat.TRANSFER_FORMAT_RAW,
      });
      let t: pb.ImageTransfer;
      for (;;) {
        t = await transfers.getImageTransfer({ name: op.name });
        if (t.phase === pb.TransferPhase.TRANSFER_PHASE_READY) break;
        if (t.phase === pb.TransferPhase.TRANSFER_PHASE_ENDED) throw new Error(`transfer ended: ${t.error?.message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const endpoint = new TransferEndpoint(t.url, { host: t.host, tls });
      const d0 = performance.now();
      let result: TransferResult;
      try {
        result = await move(endpoint);
      } finally {
        endpoint.close();
      }
      const dataMs = performance.now() - d0;
      await api.finish(transfers.finalizeImageTransfer({ name: op.name }));
      if (result.dataBytes !== dataBytes) throw new Error(`${direction} moved ${result.dataBytes} bytes of data, expected ${dataBytes}`);
      return { totalMs: performance.now() - t0, dataMs };
    };
    const timed = (fn: () => void) => {
      const t0 = performance.now();
      fn();
      return performance.now() - t0;
    };

    const times = {
      upTotal: [] as number[],
      upData: [] as number[],
      upBase: [] as number[],
      downTotal: [] as number[],
      downData: [] as number[],
      downBase: [] as number[],
    };
    const baseTarget = path.join(domainPath, 'bench-baseline.raw');
    const localOut = path.join(work, 'download.raw');
    for (let i = 0; i < rounds; i++) {
      const up = await transfer('upload', i, (e) => upload(e, source, 'raw'));
      times.upTotal.push(up.totalMs);
      times.upData.push(up.dataMs);
      // The same image onto a fresh sparse raw file of the same storage, written O_DIRECT, then fsync (as the export's close does).
      fs.rmSync(baseTarget, { force: true });
      fs.writeFileSync(baseTarget, '');
      fs.truncateSync(baseTarget, capacityMiB * MiB);
      times.upBase.push(timed(() => execFileSync('qemu-img', ['convert', '-n', '-t', 'none', '-f', 'raw', '-O', 'raw', source, baseTarget])));

      const down = await transfer('download', i, (e) => download(e, localOut, 'raw'));
      times.downTotal.push(down.totalMs);
      times.downData.push(down.dataMs);
      fs.rmSync(localOut, { force: true });
      times.downBase.push(timed(() => execFileSync('qemu-img', ['convert', '-U', '-T', 'none', '-f', 'raw', '-O', 'raw', volumeFile, localOut])));
      fs.rmSync(localOut, { force: true });
    }
    fs.rmSync(baseTarget, { force: true });

    const mbps = (ms: number) => (dataBytes / 1e6 / (ms / 1000)).toFixed(1);
    console.log(
      `image: ${capacityMiB} MiB sparse raw, ${dataBytes / MiB} MiB of random data in 4 runs; ${rounds} rounds, median; 1 host, mTLS; load ${execFileSync('cat', ['/proc/loadavg']).toString().split(' ').slice(0, 3).join(' ')}\n`,
    );
    const row = (name: string, ms: number[], base: number[]) => [
      name,
      `${mbps(median(ms))} MB/s (${(median(ms) / 1000).toFixed(2)} s)`,
      `${mbps(median(base))} MB/s (${(median(base) / 1000).toFixed(2)} s)`,
      (median(base) / median(ms)).toFixed(2),
    ];
    printColumns(
      ['case', 'sdmesh', 'qemu-img convert', 'ratio'],
      [
        row('upload, data phase', times.upData, times.upBase),
        row('upload, whole operation', times.upTotal, times.upBase),
        row('download, data phase', times.downData, times.downBase),
        row('download, whole operation', times.downTotal, times.downBase),
      ],
    );
  } finally {
    transfers.close();
    await api.stop();
  }
}

runBench(main);
