/**
 * Failover time of a copy: the host running a Move Disk's copy is killed (every service and its
 * sanlock daemon, as a power loss) → the copy runs again on another host. Printed next to
 * sanlock's own host_dead in the same run: the moment a surviving host's sanlock reports the dead
 * host's id DEAD in the destination's lockspace (before that no host may take its leases), and
 * where the time in between went, from the scheduler's log.
 *
 *   npm run bench -- failover [rounds=1] [dataMiB=64]
 *
 * 3 hosts, io_timeout 1 s (host_dead ≈ 8·io + 60 s watchdog ≈ 70 s), copies throttled to
 * 4 MiB/s so the kill lands mid-copy. Each round takes about 1.5 minutes.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, localLeaseManagerClient, pb } from '@sdmesh/common';
import { LocalMesh, startService } from '@sdmesh/localmesh';
import { finishOperation, printColumns, runBench } from './lib';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the scheduler logged after the kill (pino JSON): the first line of each message, as seconds after the kill. */
function schedulerTimeline(logFile: string, killedAt: number): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
    if (!line.startsWith('{')) continue;
    const rec = JSON.parse(line) as { time: string | number; msg: string };
    const time = typeof rec.time === 'number' ? rec.time : Date.parse(rec.time);
    if (time < killedAt || seen.has(rec.msg)) continue;
    seen.add(rec.msg);
    out.push(`+${((time - killedAt) / 1000).toFixed(1)} s  ${rec.msg}`);
  }
  return out;
}

async function round(n: number, dataMiB: number): Promise<{ hostDead: number; running: number; copying: number; done: number; timeline: string[] }> {
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-failover-'));
  const mesh = new LocalMesh({
    dir,
    hosts: 3,
    scheduler: false,
    perHostServices: ['lease-manager', 'metadata-tx', 'data-mover'],
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0' },
    logLevel: 'warn',
  });
  await mesh.start();
  const schedulerLog = path.join(mesh.logDir, 'scheduler-1.log');
  const scheduler = await startService('scheduler', {
    host: 'scheduler-1',
    env: mesh.schedulerEnv({
      SDMESH_LOG_LEVEL: 'info',
      SDMESH_IO_TIMEOUT: '1',
      SDMESH_HOSTS: mesh.hostsSpec(),
      SDMESH_HOST_POLL_MS: '500',
      SDMESH_COPY_RATE_LIMIT: String(4 * MiB),
    }),
    logFile: schedulerLog,
  });
  const admin = mesh.credentials();
  const a = scheduler.grpcAddress;
  const domains = createClient(pb.StorageDomainServiceDefinition, a, admin);
  const disks = createClient(pb.DiskServiceDefinition, a, admin);
  const ops = createClient(pb.OperationServiceDefinition, a, admin);
  const hostsApi = createClient(pb.HostServiceDefinition, a, admin);
  const clients: Array<{ close(): void }> = [domains, disks, ops, hostsApi];
  const finish = (submitted: Promise<pb.Operation>) => finishOperation(ops, submitted);
  try {
    for (let i = 0; i < 100 && (await hostsApi.listHosts({})).hosts.filter((h) => h.healthy).length < 3; i++) await sleep(300);
    const domainIds: string[] = [];
    for (const name of ['src', 'dst']) {
      const op = await finish(domains.createStorageDomain({ requestId: `failover-${n}-${name}`, name, path: path.join(mesh.storageDir, name) }));
      domainIds.push(op.result?.$case === 'storageDomain' ? op.result.storageDomain.id : '');
    }
    const created = await finish(disks.createDisk({ requestId: `failover-${n}-disk`, storageDomainId: domainIds[0], capacityBytes: 4 * dataMiB * MiB }));
    const disk = created.result?.$case === 'disk' ? created.result.disk : undefined;
    execFileSync('dd', ['if=/dev/urandom', `of=${disk!.volumes[0]!.path}`, 'bs=1M', `count=${dataMiB}`, 'conv=notrunc', 'status=none']);
    const { name } = await disks.moveDisk({
      requestId: `failover-${n}-move`,
      storageDomainId: domainIds[0],
      diskId: disk!.id,
      targetStorageDomainId: domainIds[1],
    });

    // The copy is running (some data copied) on a host: kill that host.
    let victim = '';
    for (let i = 0; i < 600 && !victim; i++) {
      const op = await ops.getOperation({ name });
      const step = op.steps.find((s) => s.name.startsWith('copy-volume') && s.status === pb.OperationStatus.OPERATION_STATUS_RUNNING);
      if (step?.host && (step.progress?.percent ?? 0) > 1) victim = step.host;
      else await sleep(100);
    }
    if (!victim) throw new Error('the copy never ran');
    const dead = mesh.hosts.find((h) => h.name === victim)!;
    const survivors = mesh.hosts.filter((h) => h !== dead);
    const killedAt = Date.now();
    for (const s of Object.values(dead.services)) if (s?.process.running()) process.kill(s.process.pid, 'SIGKILL');
    process.kill(dead.sanlock.pid, 'SIGKILL');

    const leases = localLeaseManagerClient(`unix:${mesh.leaseSocket(survivors[0]!.name)}`);
    const asScheduler = mesh.credentials({ kind: 'scheduler' });
    const movers = survivors.map((h) => createClient(pb.DataMoverServiceDefinition, h.services['data-mover']!.grpcAddress, asScheduler));
    clients.push(leases, ...movers);
    let hostDead = 0;
    let running = 0;
    let copying = 0;
    while (!hostDead || !copying) {
      const t = (Date.now() - killedAt) / 1000;
      if (t > 300) {
        const op = await ops.getOperation({ name });
        const steps = op.steps.map((st) => `${st.name}@${st.host}:${pb.operationStatusToJSON(st.status)}#${st.attempt}`).join(' ');
        throw new Error(
          `no failover after ${t} s (host_dead seen: ${hostDead || 'no'}, job running: ${running || 'no'}); operation ${pb.operationStatusToJSON(op.status)} ${op.error?.message ?? ''}; steps ${steps}; scheduler log:\n  ${schedulerTimeline(schedulerLog, killedAt).join('\n  ')}`,
        );
      }
      if (!hostDead) {
        const { hosts } = await leases.listLockspaceHosts({ lockspace: domainIds[1] });
        if (hosts.find((h) => h.hostId === dead.hostId)?.liveness === pb.HostLiveness.HOST_LIVENESS_DEAD) hostDead = t;
      }
      if (!copying) {
        // The retry's job on a surviving host (one that already ended counts: it ran).
        const jobs = (await Promise.all(movers.map((m) => m.listJobs({})))).flatMap((r) => r.jobs);
        const job = jobs.find((j) => j.status !== pb.JobStatus.JOB_STATUS_QUEUED);
        if (job && !running) running = t;
        if (job && (job.phase === 'copying' || job.status === pb.JobStatus.JOB_STATUS_DONE)) copying = t;
      }
      await sleep(100);
    }
    await finish(Promise.resolve({ name } as pb.Operation));
    const done = (Date.now() - killedAt) / 1000;
    return { hostDead, running, copying, done, timeline: schedulerTimeline(schedulerLog, killedAt) };
  } finally {
    for (const c of clients) c.close();
    await scheduler.process.stop('SIGTERM', 10_000);
    await mesh.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const rounds = Number(process.argv[2] ?? 1);
  const dataMiB = Number(process.argv[3] ?? 64);
  console.log(`a host killed mid-copy (Move Disk, ${dataMiB} MiB of data, copies at 4 MiB/s), 3 hosts, io_timeout 1 s; seconds after the kill\n`);
  const rows: string[][] = [];
  for (let n = 1; n <= rounds; n++) {
    const r = await round(n, dataMiB);
    rows.push([
      String(n),
      r.hostDead.toFixed(1),
      r.running.toFixed(1),
      r.copying.toFixed(1),
      `${(r.copying - r.hostDead >= 0 ? '+' : '') + (r.copying - r.hostDead).toFixed(1)}`,
      r.done.toFixed(1),
    ]);
    console.log(
      `round ${n}: host_dead ${r.hostDead.toFixed(1)} s, copying on another host ${r.copying.toFixed(1)} s; the scheduler's view:\n  ${r.timeline.join('\n  ')}\n`,
    );
  }
  printColumns(['round', 'host_dead (sanlock)', 'job on another host', 'copying there', 'copying − host_dead', 'operation DONE'], rows);
}

runBench(main);
