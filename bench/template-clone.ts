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
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { LocalMesh, startService } from '@sdmesh/localmesh';
import { printTable, summarize } from './lib';

const MiB = 1024 * 1024;
const DONE = pb.OperationStatus.OPERATION_STATUS_DONE;
const ENDED = new Set([DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 5);
  const capacityMiB = Number(process.argv[3] ?? 1024);
  const dataMiB = Number(process.argv[4] ?? 512);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-clone-'));
  const mesh = new LocalMesh({
    dir,
    hosts: 2,
    scheduler: false,
    perHostServices: ['lease-manager', 'metadata-tx', 'data-mover'],
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0' },
    logLevel: 'warn',
  });
  await mesh.start();
  const s = await startService('scheduler', {
    host: 'scheduler-1',
    env: mesh.schedulerEnv({ SDMESH_LOG_LEVEL: 'warn', SDMESH_IO_TIMEOUT: '1', SDMESH_HOSTS: mesh.hostsSpec(), SDMESH_HOST_POLL_MS: '500' }),
    logFile: path.join(mesh.logDir, 'scheduler-1.log'),
  });
  const admin = mesh.credentials();
  const domains = createClient(pb.StorageDomainServiceDefinition, s.grpcAddress, admin);
  const disks = createClient(pb.DiskServiceDefinition, s.grpcAddress, admin);
  const ops = createClient(pb.OperationServiceDefinition, s.grpcAddress, admin);
  const hosts = createClient(pb.HostServiceDefinition, s.grpcAddress, admin);
  const finish = async (submitted: Promise<pb.Operation>): Promise<pb.Operation['result']> => {
    const { name } = await submitted;
    for (;;) {
      const op = await ops.waitOperation({ name, timeoutSeconds: 10 }, { timeoutMs: 20_000 });
      if (!ENDED.has(op.status)) continue;
      if (op.status !== DONE) throw new Error(`${name} ended ${pb.operationStatusToJSON(op.status)}: ${op.error?.message}`);
      return op.result;
    }
  };
  const finishDisk = async (submitted: Promise<pb.Operation>): Promise<pb.Disk> => {
    const result = await finish(submitted);
    if (result?.$case !== 'disk') throw new Error('no disk in the result');
    return result.disk;
  };
  try {
    for (let i = 0; i < 100 && (await hosts.listHosts({})).hosts.filter((h) => h.healthy).length < 2; i++) await new Promise((r) => setTimeout(r, 300));
    const created = await finish(domains.createStorageDomain({ requestId: 'bench-domain', name: 'bench', path: path.join(mesh.storageDir, 'bench') }));
    const domainId = created?.$case === 'storageDomain' ? created.storageDomain.id : '';
    const template = await finishDisk(disks.createDisk({ requestId: 'bench-template', storageDomainId: domainId, capacityBytes: capacityMiB * MiB }));
    execFileSync('dd', ['if=/dev/urandom', `of=${template.volumes[0]!.path}`, 'bs=1M', `count=${dataMiB}`, 'conv=notrunc', 'status=none']);
    execFileSync('sync');
    await finish(disks.markDiskTemplate({ requestId: 'bench-mark', storageDomainId: domainId, diskId: template.id }));

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
    for (const c of [domains, disks, ops, hosts]) c.close();
    await s.process.stop('SIGTERM', 10_000);
    await mesh.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
