/** Small helpers shared by the benchmarks. */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as sanlock from '@sdmesh/sanlock';
import { createClient, pb, type ServiceClient } from '@sdmesh/common';
import { LocalMesh, LocalPki, NatsServer, SanlockDaemon, startService, type RunningService } from '@sdmesh/localmesh';
import type { OperationRecord } from '@sdmesh/scheduler/dist/operation-store';

export function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export interface LatencySummary {
  name: string;
  n: number;
  p50: number;
  p90: number;
  p95: number;
  p99: number;
  mean: number;
  opsPerSecond: number;
}

/** Runs fn n times (after warmup) sequentially and summarizes the latencies in ms. */
export async function measure(name: string, n: number, fn: () => Promise<void>, warmup = 10): Promise<LatencySummary> {
  for (let i = 0; i < warmup; i++) await fn();
  const times: number[] = [];
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return summarize(name, times, Number(process.hrtime.bigint() - start) / 1e9);
}

/** Summarizes latencies in ms of calls that took totalSeconds of wall time in all. */
export function summarize(name: string, latenciesMs: number[], totalSeconds: number): LatencySummary {
  const times = [...latenciesMs].sort((a, b) => a - b);
  const n = times.length;
  return {
    name,
    n,
    p50: percentile(times, 50),
    p90: percentile(times, 90),
    p95: percentile(times, 95),
    p99: percentile(times, 99),
    mean: times.reduce((a, b) => a + b, 0) / n,
    opsPerSecond: n / totalSeconds,
  };
}

export function printTable(rows: LatencySummary[], baseline?: string): void {
  const base = rows.find((r) => r.name === baseline);
  const header = ['case', 'n', 'p50 ms', 'p90 ms', 'p99 ms', 'ops/s', base ? `p50 vs ${base.name}` : ''];
  const lines = rows.map((r) => [
    r.name,
    String(r.n),
    r.p50.toFixed(2),
    r.p90.toFixed(2),
    r.p99.toFixed(2),
    r.opsPerSecond.toFixed(1),
    base ? `${(r.p50 / base.p50).toFixed(2)}x` : '',
  ]);
  printColumns(header, lines);
}

/** Prints rows as aligned columns, two spaces apart. */
export function printColumns(header: string[], lines: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  for (const l of [header, ...lines])
    console.log(
      l
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    );
}

/** Runs a benchmark's main: exit 0 when it is done, 1 with the error when it fails. */
export function runBench(main: () => Promise<void>): void {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}

/** A mesh for benchmarks through the public API, and its clients (as the admin user). */
const ENDED = new Set([pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);

/** Waits for a submitted operation to end; throws unless it is DONE. */
export async function finishOperation(ops: ServiceClient<typeof pb.OperationServiceDefinition>, submitted: Promise<pb.Operation>): Promise<pb.Operation> {
  const { name } = await submitted;
  for (;;) {
    const op = await ops.waitOperation({ name, timeoutSeconds: 10 }, { timeoutMs: 20_000 });
    if (!ENDED.has(op.status)) continue;
    if (op.status !== pb.OperationStatus.OPERATION_STATUS_DONE) throw new Error(`${name} ended ${pb.operationStatusToJSON(op.status)}: ${op.error?.message}`);
    return op;
  }
}

export interface ApiMesh {
  dir: string;
  mesh: LocalMesh;
  /** The scheduler's gRPC address (for clients of other services, e.g. ImageTransferService). */
  schedulerAddress: string;
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  /** Waits for a submitted operation to end; throws unless it is DONE. */
  finish(submitted: Promise<pb.Operation>): Promise<pb.Operation>;
  /** Creates a storage domain named `name` under the mesh's storage; its id. */
  createDomain(name: string): Promise<string>;
  stop(): Promise<void>;
}

/** `hosts` sanlock hosts (lease-manager, metadata-tx, data-mover each) and one SDM scheduler, every host healthy; io_timeout 1 s. */
export async function startApiMesh(prefix: string, hosts: number): Promise<ApiMesh> {
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', `sdmesh-bench-${prefix}-`));
  const mesh = new LocalMesh({
    dir,
    hosts,
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
  const hostsApi = createClient(pb.HostServiceDefinition, s.grpcAddress, admin);
  for (let i = 0; i < 100 && (await hostsApi.listHosts({})).hosts.filter((h) => h.healthy).length < hosts; i++) await new Promise((r) => setTimeout(r, 300));
  const finish = (submitted: Promise<pb.Operation>) => finishOperation(ops, submitted);
  return {
    dir,
    mesh,
    schedulerAddress: s.grpcAddress,
    domains,
    disks,
    ops,
    finish,
    async createDomain(name) {
      const op = await finish(domains.createStorageDomain({ requestId: `bench-domain-${name}`, name, path: path.join(mesh.storageDir, name) }));
      return op.result?.$case === 'storageDomain' ? op.result.storageDomain.id : '';
    },
    async stop() {
      for (const c of [domains, disks, ops, hostsApi]) c.close();
      await s.process.stop('SIGTERM', 10_000);
      await mesh.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The record of an ended Move Disk operation of 6 DONE copy steps, as the scheduler stores it
 * (benchmarks write such records straight into KV): on `diskId` (default: a new one) of a domain.
 */
export function endedMoveRecord(i: number, domainId: string, opts: { diskId?: string; owner?: string } = {}): OperationRecord {
  const id = randomUUID();
  const now = new Date();
  const progress = { percent: 100, bytesDone: 1 << 30, bytesTotal: 1 << 30, mbps: 100 };
  const steps = Array.from({ length: 6 }, () =>
    pb.OperationStep.fromPartial({
      name: `copy-volume:${randomUUID()}`,
      status: pb.OperationStatus.OPERATION_STATUS_DONE,
      host: 'host1',
      attempt: 1,
      progress,
    }),
  );
  return {
    id,
    op: pb.Operation.fromPartial({
      name: `operations/${id}`,
      requestId: `bench-${i}`,
      type: pb.OperationType.OPERATION_TYPE_MOVE_DISK,
      status: pb.OperationStatus.OPERATION_STATUS_DONE,
      createTime: now,
      updateTime: now,
      progress,
      targetResources: [`storageDomains/${domainId}/disks/${opts.diskId ?? randomUUID()}`],
      steps,
    }),
    fingerprint: 'f'.repeat(64),
    params: { domainId },
    locks: [],
    waitForLocks: false,
    locksHeld: false,
    owner: opts.owner ?? '',
    ownerBeatMs: 0,
    cancelRequested: false,
    state: { results: {} },
  };
}

/** One host's lease stack: a sanlock daemon (also this process's, for libsanlock), nats for the events, and the lease-manager on its unix socket. */
export interface LeaseManagerStack {
  daemon: SanlockDaemon;
  lm: RunningService;
  /** The lease-manager's unix socket path. */
  socket: string;
  stop(): Promise<void>;
}

export async function startLeaseManagerStack(
  dir: string,
  /**
   * Run the lease-manager as deployed (helm, systemd): log level info (an audit line per lease
   * call) and a state directory (its held-lease table written on every grant and release).
   * Without it: level warn and no state directory.
   */
  opts: { asDeployed?: boolean } = {},
): Promise<LeaseManagerStack> {
  const pki = new LocalPki(path.join(dir, 'pki'));
  const nats = await new NatsServer(path.join(dir, 'nats'), { hosts: ['bench'], pki }).start();
  const socket = path.join(dir, 'run', 'lease-manager.sock');
  const daemon = await new SanlockDaemon(`bench-${process.pid}`, path.join(dir, 'sanlock')).start();
  sanlock.setRunDir(daemon.runDir);
  try {
    const lm = await startService('lease-manager', {
      host: 'bench',
      env: {
        ...daemon.env,
        ...nats.clientEnv('bench'),
        ...LocalPki.env(pki.forIdentity({ kind: 'host', host: 'bench', service: 'lease-manager' })),
        SDMESH_LEASE_SOCKET: socket,
        SDMESH_HOST_ID: '1',
        ...(opts.asDeployed ? { SDMESH_LOG_LEVEL: 'info', SDMESH_STATE_DIR: path.join(dir, 'lease-manager-state') } : { SDMESH_LOG_LEVEL: 'warn' }),
      },
      logFile: path.join(dir, 'lease-manager.log'),
    });
    return {
      daemon,
      lm,
      socket,
      stop: async () => {
        await lm.process.stop();
        await daemon.stop();
        await nats.stop();
      },
    };
  } catch (err) {
    await daemon.stop();
    await nats.stop();
    throw err;
  }
}
