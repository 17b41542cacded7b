/**
 * DeleteSnapshot of an internal volume holding dataMiB of data vs a bare `qemu-img commit` of the
 * same chain, in one run on one disk. The mesh: 2 sanlock hosts (lease-manager, metadata-tx,
 * data-mover each) and one SDM scheduler. Each round builds two identical chains, a raw base of
 * capacityMiB with 64 MiB of data ← mid (qcow2, dataMiB written) ← leaf (qcow2, 16 MiB written):
 * one as an sdmesh disk (CreateDisk, SnapshotDisk ×2, data by qemu-io), one as plain files; then
 *   - sdmesh: DeleteSnapshot(mid), timed from the call to DONE as the client sees it (with the
 *     merge-volume and finalize-merge steps' own times);
 *   - baselines: `qemu-img commit -d` of mid into the base with qemu-img's default cache and with
 *     `-t none` (O_DIRECT), each then an fsync of the base (sdmesh fsyncs it before writing it LEGAL).
 *
 *   npm run bench -- delete-snapshot [rounds=3] [dataMiB=1024] [capacityMiB=2048]
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pb } from '@sdmesh/common';
import { printTable, runBench, startApiMesh, summarize } from './lib';

const MiB = 1024 * 1024;

/** Writes countMiB of a byte pattern at offsetMiB, in 256 MiB pieces of changing patterns (no two pieces alike). */
function fill(file: string, format: 'raw' | 'qcow2', offsetMiB: number, countMiB: number, seed: number): void {
  const cmds: string[] = [];
  for (let done = 0, i = 0; done < countMiB; done += 256, i++)
    cmds.push('-c', `write -P ${(seed + i * 7) % 255} ${offsetMiB + done}M ${Math.min(256, countMiB - done)}M`);
  execFileSync('qemu-io', ['-f', format, ...cmds, file], { stdio: 'ignore' });
}

const msBetween = (a?: Date, b?: Date) => (a && b ? b.getTime() - a.getTime() : NaN);

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 3);
  const dataMiB = Number(process.argv[3] ?? 1024);
  const capacityMiB = Number(process.argv[4] ?? 2048);
  const api = await startApiMesh('merge', 2);
  const { disks, finish } = api;
  const chainOf = async (op: Promise<pb.Operation>) => {
    const r = (await finish(op)).result;
    if (r?.$case !== 'disk') throw new Error('no disk in the result');
    return r.disk;
  };
  try {
    const domainId = await api.createDomain('bench');
    const plain = path.join(api.dir, 'plain');
    fs.mkdirSync(plain);

    const times: Record<'sdmesh' | 'bare' | 'bareDirect', number[]> = { sdmesh: [], bare: [], bareDirect: [] };
    const steps: Record<'merge' | 'finalize', number[]> = { merge: [], finalize: [] };
    for (let r = 0; r < rounds; r++) {
      // The sdmesh chain.
      const disk = await chainOf(disks.createDisk({ requestId: `bench-disk-${r}`, storageDomainId: domainId, capacityBytes: capacityMiB * MiB }));
      fill(disk.volumes[0]!.path, 'raw', 0, 64, 11);
      const mid = (await chainOf(disks.snapshotDisk({ requestId: `bench-snap1-${r}`, storageDomainId: domainId, diskId: disk.id }))).volumes[1]!;
      fill(mid.path, 'qcow2', 32, dataMiB, 23);
      const leaf = (await chainOf(disks.snapshotDisk({ requestId: `bench-snap2-${r}`, storageDomainId: domainId, diskId: disk.id }))).volumes[2]!;
      fill(leaf.path, 'qcow2', 0, 16, 37);
      // The same chain as plain files.
      const [b, m, l] = ['base', 'mid', 'leaf'].map((n) => path.join(plain, `${n}-${r}`));
      execFileSync('qemu-img', ['create', '-q', '-f', 'raw', b!, `${capacityMiB}M`]);
      fill(b!, 'raw', 0, 64, 11);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.basename(b!), '-F', 'raw', m!]);
      fill(m!, 'qcow2', 32, dataMiB, 23);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.basename(m!), '-F', 'qcow2', l!]);
      fill(l!, 'qcow2', 0, 16, 37);
      execFileSync('sync');

      // Alternate which goes first, so neither always gets the warmer page cache.
      const runSdmesh = async () => {
        const t0 = process.hrtime.bigint();
        const op = await finish(disks.deleteSnapshot({ requestId: `bench-merge-${r}`, storageDomainId: domainId, diskId: disk.id, volumeId: mid.id }));
        times.sdmesh.push(Number(process.hrtime.bigint() - t0) / 1e6);
        const step = (prefix: string) => op.steps.find((x) => x.name.startsWith(prefix));
        steps.merge.push(msBetween(step('merge-volume')?.startTime, step('merge-volume')?.endTime));
        steps.finalize.push(msBetween(step('finalize-merge')?.startTime, step('finalize-merge')?.endTime));
      };
      // The same commit twice on the plain chain (the same work again): qemu-img's default cache,
      // then O_DIRECT (-t none), each followed by an fsync of the base.
      const runBare = (cache: 'writeback' | 'none') => {
        const t0 = process.hrtime.bigint();
        execFileSync('qemu-img', ['commit', '-q', '-d', '-t', cache, '-f', 'qcow2', m!], { cwd: plain });
        execFileSync('sync', [b!]);
        times[cache === 'none' ? 'bareDirect' : 'bare'].push(Number(process.hrtime.bigint() - t0) / 1e6);
      };
      if (r % 2 === 0) {
        await runSdmesh();
        runBare('writeback');
        runBare('none');
      } else {
        runBare('none');
        runBare('writeback');
        await runSdmesh();
      }
      for (const f of [b, m, l]) fs.rmSync(f!);
      await finish(disks.deleteDisk({ requestId: `bench-delete-${r}`, storageDomainId: domainId, diskId: disk.id }));
    }
    console.log(
      `chain: raw base ${capacityMiB} MiB (64 MiB data) ← mid qcow2 (${dataMiB} MiB data) ← leaf qcow2 (16 MiB); ${rounds} merges of mid each way, alternating, 2 hosts\n`,
    );
    const seconds = (ms: number[]) => ms.reduce((a, b) => a + b, 0) / 1000;
    printTable(
      [
        summarize('bare qemu-img commit', times.bare, seconds(times.bare)),
        summarize('bare qemu-img commit -t none', times.bareDirect, seconds(times.bareDirect)),
        summarize('sdmesh DeleteSnapshot', times.sdmesh, seconds(times.sdmesh)),
      ],
      'bare qemu-img commit',
    );
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    console.log(`\nsdmesh steps (median): merge-volume ${median(steps.merge).toFixed(0)} ms, finalize-merge ${median(steps.finalize).toFixed(0)} ms`);
  } finally {
    await api.stop();
  }
}

runBench(main);
