/**
 * A thin clone's create time vs a full copy of the same template, in one run on one mesh (2
 * sanlock hosts, lease-manager + metadata-tx + data-mover each, one SDM scheduler): a template
 * of capacityMiB with dataMiB of random data, then `rounds` CloneDisk THIN and FULL operations,
 * alternating, one at a time. Each is timed from the CloneDisk call to the operation's DONE as
 * the client sees it (WaitOperation), and the clone's allocated bytes are reported.
 *
 *   npm run bench -- template-clone [rounds=5] [capacityMiB=1024] [dataMiB=512]
 */
import { execFileSync } from 'node:child_process';
import { pb } from '@sdmesh/common';
import { printTable, runBench, startApiMesh, summarize } from './lib';

const MiB = 1024 * 1024;

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 5);
  const capacityMiB = Number(process.argv[3] ?? 1024);
  const dataMiB = Number(process.argv[4] ?? 512);
  const api = await startApiMesh('clone', 2);
  const { disks } = api;
  const finishDisk = async (submitted: Promise<pb.Operation>): Promise<pb.Disk> => {
    const result = (await api.finish(submitted)).result;
    if (result?.$case !== 'disk') throw new Error('no disk in the result');
    return result.disk;
  };
  try {
    const domainId = await api.createDomain('bench');
    const template = await finishDisk(disks.createDisk({ requestId: 'bench-template', storageDomainId: domainId, capacityBytes: capacityMiB * MiB }));
    execFileSync('dd', ['if=/dev/urandom', `of=${template.volumes[0]!.path}`, 'bs=1M', `count=${dataMiB}`, 'conv=notrunc', 'status=none']);
    execFileSync('sync');
    await api.finish(disks.markDiskTemplate({ requestId: 'bench-mark', storageDomainId: domainId, diskId: template.id }));

    const times: Record<'thin' | 'full', number[]> = { thin: [], full: [] };
    const allocated: Record<'thin' | 'full', number> = { thin: 0, full: 0 };
    for (let r = 0; r < rounds; r++) {
      for (const mode of ['thin', 'full'] as const) {
        const t0 = process.hrtime.bigint();
        const clone = await finishDisk(
          disks.cloneDisk({
            requestId: `bench-${mode}-${r}`,
            storageDomainId: domainId,
            templateDiskId: template.id,
            mode: mode === 'thin' ? pb.CloneMode.CLONE_MODE_THIN : pb.CloneMode.CLONE_MODE_FULL,
          }),
        );
        times[mode].push(Number(process.hrtime.bigint() - t0) / 1e6);
        allocated[mode] = clone.volumes.reduce((sum, v) => sum + v.actualSizeBytes, 0);
      }
    }
    console.log(`template: ${capacityMiB} MiB raw with ${dataMiB} MiB of random data; ${rounds} clones of each kind, alternating, one at a time, 2 hosts\n`);
    const seconds = (ms: number[]) => ms.reduce((a, b) => a + b, 0) / 1000;
    printTable([summarize('full copy', times.full, seconds(times.full)), summarize('thin clone', times.thin, seconds(times.thin))], 'full copy');
    console.log(`\nallocated by one clone: thin ${(allocated.thin / MiB).toFixed(2)} MiB, full ${(allocated.full / MiB).toFixed(1)} MiB`);
  } finally {
    await api.stop();
  }
}

runBench(main);
