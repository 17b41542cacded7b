/**
 * Move Disk throughput, SDM vs SPM, in one run on one mesh (3 sanlock hosts, every per-host
 * service): N concurrent Move Disk operations through a scheduler in SDM mode (each step on
 * the least-loaded healthy host) and through a second scheduler in SPM mode (every step on
 * the SPM host), each with its own KV namespace and domains. Reports wall time per batch and
 * each host's share of the copy steps.
 *
 *   npm run bench -- scheduler-move [disks=8] [capacityMiB=256] [dataMiB=128] [maxJobsPerHost=2] [jobRateMiB=0] [volumesPerDisk=1]
 *
 * jobRateMiB throttles each copy job (qemu-img -r): it stands in for a per-host bandwidth limit
 * (NIC/HBA) that one machine with one disk does not have; 0 = unthrottled, the shared disk is the limit.
 * volumesPerDisk > 1 gives each disk a chain: the base and volumesPerDisk - 1 snapshots, dataMiB
 * split evenly over the layers (each layer's own data at its own offset), so a disk holds the same
 * data whatever its chain; a move copies each layer as its own job (issue 17: all at once).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { LocalMesh, startService } from '@sdmesh/localmesh';

const MiB = 1024 * 1024;
const DONE = pb.OperationStatus.OPERATION_STATUS_DONE;
const ENDED = new Set([DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);

type Api = {
  domains: ReturnType<typeof createClient<typeof pb.StorageDomainServiceDefinition>>;
  disks: ReturnType<typeof createClient<typeof pb.DiskServiceDefinition>>;
  hosts: ReturnType<typeof createClient<typeof pb.HostServiceDefinition>>;
  ops: ReturnType<typeof createClient<typeof pb.OperationServiceDefinition>>;
};

async function waitOp(api: Api, name: string): Promise<pb.Operation> {
  for (;;) {
    const op = await api.ops.waitOperation({ name, timeoutSeconds: 10 }, { timeoutMs: 20_000 });
    if (ENDED.has(op.status)) {
      if (op.status !== DONE) throw new Error(`${name} ended ${pb.operationStatusToJSON(op.status)}: ${op.error?.message}`);
      return op;
    }
  }
}

/** Median duration in seconds of each kind of step ("copy-volume:<id>" → copy-volume), and of the wait from the call to the first step. */
function stepSummary(ops: pb.Operation[], calledAt: number): Map<string, number> {
  const byKind = new Map<string, number[]>();
  const add = (kind: string, s: number) => byKind.set(kind, [...(byKind.get(kind) ?? []), s]);
  for (const op of ops) {
    const starts = op.steps.map((s) => s.startTime?.getTime() ?? Infinity);
    if (starts.length) add('(until first step)', (Math.min(...starts) - calledAt) / 1000);
    for (const step of op.steps) {
      if (step.startTime && step.endTime) add(step.name.split(':')[0]!, (step.endTime.getTime() - step.startTime.getTime()) / 1000);
    }
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  return new Map([...byKind].map(([k, xs]) => [k, median(xs)]));
}

/** Random data into a qcow2 leaf at offsetMiB through qemu-io (a guest's write: into the leaf's own layer); scratch is outside the domains. */
function writeLayer(file: string, offsetMiB: number, countMiB: number, scratchDir: string): void {
  const data = path.join(scratchDir, 'layer-data');
  execFileSync('dd', ['if=/dev/urandom', `of=${data}`, 'bs=1M', `count=${countMiB}`, 'status=none']);
  try {
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -s ${data} ${offsetMiB}M ${countMiB}M`, file], { stdio: 'ignore' });
  } finally {
    fs.rmSync(data, { force: true });
  }
}

async function main(): Promise<void> {
  const disks = Number(process.argv[2] ?? 8);
  const capacityMiB = Number(process.argv[3] ?? 256);
  const dataMiB = Number(process.argv[4] ?? 128);
  const maxJobs = Number(process.argv[5] ?? 2);
  const jobRateMiB = Number(process.argv[6] ?? 0);
  const volumesPerDisk = Math.max(1, Number(process.argv[7] ?? 1));
  const layerMiB = Math.floor(dataMiB / volumesPerDisk);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-sched-'));
  const mesh = new LocalMesh({
    dir,
    hosts: 3,
    scheduler: false,
    perHostServices: ['lease-manager', 'metadata-tx', 'data-mover'],
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', SDMESH_MAX_CONCURRENT_JOBS: String(maxJobs) },
    logLevel: 'warn',
  });
  await mesh.start();
  const apis: Record<'sdm' | 'spm', Api> = {} as never;
  const stepTimes = new Map<'sdm' | 'spm', Map<string, number>>();
  // The schedulers are this process's children, not the mesh's: stopped here, or the bench never exits.
  const schedulers: Array<Awaited<ReturnType<typeof startService>>> = [];
  try {
    for (const mode of ['sdm', 'spm'] as const) {
      const s = await startService('scheduler', {
        host: `scheduler-${mode}`,
        env: mesh.schedulerEnv({
          SDMESH_LOG_LEVEL: 'warn',
          SDMESH_IO_TIMEOUT: '1',
          SDMESH_HOSTS: mesh.hostsSpec(),
          SDMESH_MODE: mode,
          SDMESH_KV_PREFIX: mode,
          SDMESH_HOST_POLL_MS: '500',
          SDMESH_COPY_RATE_LIMIT: String(jobRateMiB * MiB),
        }),
        logFile: path.join(mesh.logDir, `scheduler-${mode}.log`),
      });
      schedulers.push(s);
      const a = s.grpcAddress;
      const admin = mesh.credentials();
      apis[mode] = {
        domains: createClient(pb.StorageDomainServiceDefinition, a, admin),
        disks: createClient(pb.DiskServiceDefinition, a, admin),
        hosts: createClient(pb.HostServiceDefinition, a, admin),
        ops: createClient(pb.OperationServiceDefinition, a, admin),
      };
    }
    await new Promise((r) => setTimeout(r, 2000));
    console.log(
      `${disks} concurrent Move Disk, ${capacityMiB} MiB disks${volumesPerDisk > 1 ? ` of ${volumesPerDisk} volumes (${layerMiB} MiB of data in each layer)` : ''} with ${layerMiB * volumesPerDisk} MiB of random data, 3 hosts, data-mover max ${maxJobs} jobs/host, copy jobs ${jobRateMiB ? `throttled to ${jobRateMiB} MiB/s each` : 'unthrottled'}\n`,
    );
    console.log('mode  wall s   MB/s    copy steps per host');
    for (const mode of ['sdm', 'spm'] as const) {
      const api = apis[mode];
      const domainIds: string[] = [];
      for (const side of ['src', 'dst']) {
        const op = await waitOp(
          api,
          (
            await api.domains.createStorageDomain({
              requestId: `${mode}-${side}`,
              name: `${mode}-${side}`,
              path: path.join(mesh.storageDir, `${mode}-${side}`),
            })
          ).name,
        );
        domainIds.push(op.result?.$case === 'storageDomain' ? op.result.storageDomain.id : '');
      }
      if (mode === 'spm') {
        for (let i = 0; i < 100 && !(await api.hosts.listHosts({})).hosts.some((h) => h.isSpm); i++) await new Promise((r) => setTimeout(r, 300));
      }
      const ids: string[] = [];
      for (let i = 0; i < disks; i++) {
        const op = await waitOp(
          api,
          (await api.disks.createDisk({ requestId: `${mode}-disk-${i}`, storageDomainId: domainIds[0], capacityBytes: capacityMiB * MiB })).name,
        );
        const disk = op.result?.$case === 'disk' ? op.result.disk : undefined;
        execFileSync('dd', ['if=/dev/urandom', `of=${disk!.volumes[0]!.path}`, 'bs=1M', `count=${layerMiB}`, 'conv=notrunc', 'status=none']);
        for (let layer = 1; layer < volumesPerDisk; layer++) {
          await waitOp(api, (await api.disks.snapshotDisk({ requestId: `${mode}-snap-${i}-${layer}`, storageDomainId: domainIds[0], diskId: disk!.id })).name);
          const leaf = (await api.disks.getDisk({ storageDomainId: domainIds[0], diskId: disk!.id })).volumes[layer]!;
          writeLayer(leaf.path, layer * layerMiB, layerMiB, dir);
        }
        ids.push(disk!.id);
      }
      execFileSync('sync');
      const t0 = Date.now();
      const ops = await Promise.all(
        ids.map((id, i) =>
          api.disks.moveDisk({ requestId: `${mode}-move-${i}`, storageDomainId: domainIds[0], diskId: id, targetStorageDomainId: domainIds[1] }),
        ),
      );
      const done = await Promise.all(ops.map((o) => waitOp(api, o.name)));
      const wall = (Date.now() - t0) / 1000;
      const share = new Map<string, number>();
      for (const op of done) for (const s of op.steps) if (s.name.startsWith('copy-volume')) share.set(s.host, (share.get(s.host) ?? 0) + 1);
      const perHost = ['host1', 'host2', 'host3'].map((h) => `${h}=${share.get(h) ?? 0}`).join(' ');
      console.log(`${mode}   ${wall.toFixed(1).padStart(6)}  ${((disks * layerMiB * volumesPerDisk * MiB) / 1e6 / wall).toFixed(1).padStart(6)}   ${perHost}`);
      stepTimes.set(mode, stepSummary(done, t0));
    }
    // Where an operation's time goes: the median of each kind of step, and the wait before the first step (locks, placement).
    console.log('\nmedian seconds per step (sdm | spm):');
    for (const kind of new Set([...stepTimes.values()].flatMap((m) => [...m.keys()]))) {
      const cell = (mode: 'sdm' | 'spm') => (stepTimes.get(mode)?.get(kind) ?? NaN).toFixed(2).padStart(6);
      console.log(`  ${kind.padEnd(20)} ${cell('sdm')} | ${cell('spm')}`);
    }
  } finally {
    for (const a of Object.values(apis)) Object.values(a).forEach((c) => c.close());
    await Promise.all(schedulers.map((s) => s.process.stop('SIGTERM', 10_000).catch(() => undefined)));
    await mesh.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
