/**
 * What mTLS costs per call, plaintext vs mTLS in one run, on persistent channels (connections
 * set up and warmed before anything is timed):
 *
 * - the standard `grpc.health.v1.Health/Check` on the scheduler: one hop and no handler work,
 *   the transport and authentication cost alone;
 * - `GetDisk` through the scheduler's public API (client → scheduler → metadata-tx ListVolumes:
 *   two gRPC hops, both TLS in the mTLS mesh);
 * - `GetLeaseOwner` on the lease-manager's scheduler-facing TCP port, as the scheduler;
 * - lease acquire+release on the lease-manager's unix socket (the host-local lease API: no TLS
 *   on that path in either mesh), next to the sanlock library called in-process.
 *
 * Two meshes of one host run side by side (`insecure: true`, and mTLS as deployed); the timed
 * calls alternate between them in rounds (which one goes first alternates too), so that drift
 * in the machine's load falls on both alike.
 *
 *   npm run bench -- mtls-overhead [calls=1000] [rounds=10] [leaseCycles=200]
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as sanlock from '@sdmesh/sanlock';
import {
  createClient,
  TLS_CHANNEL_OPTIONS,
  createLogger,
  DOMAIN_LEASE,
  DomainLeases,
  LeaseHolder,
  localLeaseManagerClient,
  pb,
  type ServiceClient,
} from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';
import { measure, printColumns, printTable, runBench, summarize, type LatencySummary } from './lib';

const ENDED = new Set([pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);
const MODES = ['plaintext', 'mTLS'] as const;
type Mode = (typeof MODES)[number];

interface Side {
  mesh: LocalMesh;
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  hosts: ServiceClient<typeof pb.HostServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  /** The lease-manager's TCP port, as the scheduler. */
  leaseManager: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
  /** A raw channel to the scheduler for the standard health check (the cheapest call there is). */
  raw: grpc.Client;
  domain?: pb.StorageDomain;
  disk?: pb.Disk;
}

async function done(side: Side, p: Promise<pb.Operation>): Promise<pb.Operation> {
  const { name } = await p;
  for (;;) {
    const op = await side.ops.waitOperation({ name, timeoutSeconds: 10 }, { timeoutMs: 20_000 });
    if (!ENDED.has(op.status)) continue;
    if (op.status !== pb.OperationStatus.OPERATION_STATUS_DONE) throw new Error(`${name} ended ${pb.operationStatusToJSON(op.status)}: ${op.error?.message}`);
    return op;
  }
}

async function startSide(sides: Partial<Record<Mode, Side>>, mode: Mode, dir: string): Promise<Side> {
  const mesh = new LocalMesh({
    dir,
    hosts: 1,
    insecure: mode === 'plaintext',
    perHostServices: ['lease-manager', 'metadata-tx', 'data-mover'],
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', SDMESH_HOST_POLL_MS: '500' },
    logLevel: 'warn',
  });
  await mesh.start();
  const at = mesh.scheduler!.grpcAddress;
  const admin = mesh.credentials();
  const side: Side = {
    mesh,
    domains: createClient(pb.StorageDomainServiceDefinition, at, admin),
    disks: createClient(pb.DiskServiceDefinition, at, admin),
    hosts: createClient(pb.HostServiceDefinition, at, admin),
    ops: createClient(pb.OperationServiceDefinition, at, admin),
    leaseManager: createClient(
      pb.LeaseManagerServiceDefinition,
      mesh.hosts[0]!.services['lease-manager']!.grpcAddress,
      mesh.credentials({ kind: 'scheduler' }),
    ),
    raw: new grpc.Client(at, admin, TLS_CHANNEL_OPTIONS),
  };
  sides[mode] = side; // stopped by main from here on, whatever fails next
  for (let i = 0; !(await side.hosts.listHosts({})).hosts.some((h) => h.healthy); i++) {
    if (i > 100) throw new Error(`${dir}: host1 never became healthy`);
    await new Promise((r) => setTimeout(r, 300));
  }
  const created = await done(side, side.domains.createStorageDomain({ requestId: 'bench-domain', name: 'bench', path: path.join(mesh.storageDir, 'bench') }));
  side.domain = created.result?.$case === 'storageDomain' ? created.result.storageDomain : undefined;
  const disk = await done(side, side.disks.createDisk({ requestId: 'bench-disk', storageDomainId: side.domain!.id, capacityBytes: 64 * 1024 * 1024 }));
  side.disk = disk.result?.$case === 'disk' ? disk.result.disk : undefined;
  return side;
}

function closeSide(side: Side): void {
  for (const c of [side.domains, side.disks, side.hosts, side.ops, side.leaseManager, side.raw]) c.close();
}

/** Times `calls` sequential calls per mode, in `rounds` alternating slices; latencies in ms. */
async function compare(name: string, calls: number, rounds: number, fns: Record<Mode, () => Promise<unknown>>): Promise<Record<Mode, LatencySummary>> {
  const times: Record<Mode, number[]> = { plaintext: [], mTLS: [] };
  const wall: Record<Mode, number> = { plaintext: 0, mTLS: 0 };
  // Warm-up: connections are up (TLS handshakes done), code paths compiled on both sides.
  for (const mode of MODES) for (let i = 0; i < Math.max(50, calls / 10); i++) await fns[mode]();
  const perRound = Math.ceil(calls / rounds);
  for (let r = 0; r < rounds; r++) {
    for (const mode of r % 2 ? [...MODES].reverse() : MODES) {
      const start = process.hrtime.bigint();
      for (let i = 0; i < perRound; i++) {
        const t = process.hrtime.bigint();
        await fns[mode]();
        times[mode].push(Number(process.hrtime.bigint() - t) / 1e6);
      }
      wall[mode] += Number(process.hrtime.bigint() - start) / 1e9;
    }
  }
  return { plaintext: summarize(`${name}, plaintext`, times.plaintext, wall.plaintext), mTLS: summarize(`${name}, mTLS`, times.mTLS, wall.mTLS) };
}

async function main(): Promise<void> {
  const calls = Number(process.argv[2] ?? 1000);
  const rounds = Number(process.argv[3] ?? 10);
  const leaseCycles = Number(process.argv[4] ?? 200);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-mtls-'));
  const sides: Partial<Record<Mode, Side>> = {};
  let holder: LeaseHolder | undefined;
  try {
    const plain = await startSide(sides, 'plaintext', path.join(dir, 'plaintext'));
    const tls = await startSide(sides, 'mTLS', path.join(dir, 'mtls'));
    console.log(
      `per-call latency, plaintext vs mTLS, persistent channels, 1 host per mesh, ${calls} sequential calls per case and mode in ${rounds} alternating rounds (${os.cpus().length} cores)\n`,
    );

    const getDisk = (s: Side) => () => s.disks.getDisk({ storageDomainId: s.domain!.id, diskId: s.disk!.id });
    const owner = (s: Side) => {
      const lease = { lease: DomainLeases.location(s.domain!, DOMAIN_LEASE.resource, DOMAIN_LEASE.slot) };
      return () => s.leaseManager.getLeaseOwner(lease);
    };
    // grpc.health.v1.Health/Check with an empty request (all services): one hop, no handler work.
    const health = (s: Side) => () =>
      new Promise<void>((resolve, reject) =>
        s.raw.makeUnaryRequest(
          '/grpc.health.v1.Health/Check',
          () => Buffer.alloc(0),
          (b: Buffer) => b,
          {},
          (err) => (err ? reject(err) : resolve()),
        ),
      );
    const rows: Array<[string, Record<Mode, LatencySummary>]> = [
      ['Health/Check (scheduler, 1 hop)', await compare('Health/Check', calls, rounds, { plaintext: health(plain), mTLS: health(tls) })],
      ['GetDisk (public API, 2 hops)', await compare('GetDisk', calls, rounds, { plaintext: getDisk(plain), mTLS: getDisk(tls) })],
      ['GetLeaseOwner (lease-manager TCP)', await compare('GetLeaseOwner', calls, rounds, { plaintext: owner(plain), mTLS: owner(tls) })],
    ];
    const header = ['call', 'mode', 'n', 'ops/s', 'p50 ms', 'p95 ms', 'p99 ms', 'mTLS/plaintext p50', 'p95', 'p99', 'ops/s'];
    const lines: string[][] = [];
    for (const [call, r] of rows) {
      for (const mode of MODES) {
        const s = r[mode];
        const ratio = (k: 'p50' | 'p95' | 'p99' | 'opsPerSecond') => (mode === 'mTLS' ? `${(s[k] / r.plaintext[k]).toFixed(3)}x` : 'baseline');
        lines.push([
          call,
          mode,
          String(s.n),
          s.opsPerSecond.toFixed(0),
          s.p50.toFixed(3),
          s.p95.toFixed(3),
          s.p99.toFixed(3),
          ratio('p50'),
          ratio('p95'),
          ratio('p99'),
          ratio('opsPerSecond'),
        ]);
      }
    }
    printColumns(header, lines);
    for (const [call, r] of rows) {
      console.log(
        `${call}: mTLS adds ${(((r.mTLS.p50 - r.plaintext.p50) / r.plaintext.p50) * 100).toFixed(1)} % at p50 (${((r.mTLS.p50 - r.plaintext.p50) * 1000).toFixed(0)} µs)`,
      );
    }

    // The host-local lease path: the unix socket of the mTLS mesh's lease-manager (no TLS on it).
    const host = tls.mesh.hosts[0]!;
    sanlock.setRunDir(host.sanlock.runDir);
    const socket = `unix:${tls.mesh.leaseSocket(host.name)}`;
    const local = localLeaseManagerClient(socket);
    // A lockspace of its own, inside the storage root the lease-manager serves.
    const ids = path.join(tls.mesh.storageDir, 'bench-ls', 'dom_md', 'ids');
    const leases = path.join(tls.mesh.storageDir, 'bench-ls', 'dom_md', 'leases');
    fs.mkdirSync(path.dirname(ids), { recursive: true });
    await local.formatLockspace({ lockspace: 'benchls', path: ids, ioTimeoutSeconds: 1 });
    const loc = (resource: string, slot: number): pb.LeaseLocation => ({ lockspace: 'benchls', resource, path: leases, offset: slot * 1048576 });
    await local.formatLeases({ lockspace: 'benchls', path: leases, leases: [loc('grpc', 0), loc('addon', 1)] });
    await local.joinLockspace({ lockspace: 'benchls', path: ids, wait: true }, { timeoutMs: 60_000 });
    local.close();
    console.log(`\nlease acquire+release, exclusive, unix socket of the lease-manager (host-local; TLS plays no part), ${leaseCycles} cycles each\n`);
    // One sanlock registration per process: the in-process baseline first, then this process as a holder.
    const client = sanlock.registerProcess();
    const res = [{ name: 'addon', path: leases, offset: 1048576 }];
    const addonCase = await measure('sanlock library in-process', leaseCycles, async () => {
      await client.acquire('benchls', res);
      await client.release('benchls', res);
    });
    await client.close();
    holder = await LeaseHolder.register({ leaseManagerAddress: socket, log: createLogger('bench', 'warn'), onFence: (why) => console.error(why) });
    const h = holder;
    const socketCase = await measure('lease-manager gRPC, unix socket', leaseCycles, async () => {
      await h.acquire(loc('grpc', 0), 'exclusive', 'bench');
      await h.release(loc('grpc', 0));
    });
    printTable([addonCase, socketCase], addonCase.name);
    console.log(`(p95: ${addonCase.p95.toFixed(2)} ms vs ${socketCase.p95.toFixed(2)} ms)`);
  } finally {
    await holder?.close();
    for (const s of Object.values(sides)) closeSide(s);
    await Promise.all(Object.values(sides).map((s) => s.mesh.stop()));
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBench(main);
