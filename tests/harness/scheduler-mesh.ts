import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { ChannelCredentials } from '@grpc/grpc-js';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, pb, SdmeshError, subscribeEvents, type ServiceClient } from '@sdmesh/common';
import { LOCAL_USERS, LocalMesh, startService, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from './paths';

export const MiB = 1024 * 1024;

export interface PublicApi {
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  hosts: ServiceClient<typeof pb.HostServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  close(): void;
}

/** The public API as one user (credentials from LocalMesh.credentials, e.g. the admin user). */
export function publicApi(address: string, credentials: ChannelCredentials): PublicApi {
  const api = {
    domains: createClient(pb.StorageDomainServiceDefinition, address, credentials),
    disks: createClient(pb.DiskServiceDefinition, address, credentials),
    hosts: createClient(pb.HostServiceDefinition, address, credentials),
    ops: createClient(pb.OperationServiceDefinition, address, credentials),
  };
  return { ...api, close: () => Object.values(api).forEach((c) => c.close()) };
}

/** The gRPC code name and reason of a failed call (or "OK"). */
export async function codeOf(p: Promise<unknown>): Promise<[string, string]> {
  try {
    await p;
    return ['OK', ''];
  } catch (err) {
    const e = SdmeshError.fromGrpc(err);
    return [statusName(e.code), e.reason];
  }
}

/** codeOf with the message: [code name, reason, message] ("OK" for a call that succeeded). */
export async function refusalOf(p: Promise<unknown>): Promise<[string, string, string]> {
  try {
    await p;
    return ['OK', '', ''];
  } catch (err) {
    const e = SdmeshError.fromGrpc(err);
    return [statusName(e.code), e.reason, e.message];
  }
}

const statusName = (code: number) =>
  [
    'OK',
    'CANCELLED',
    'UNKNOWN',
    'INVALID_ARGUMENT',
    'DEADLINE_EXCEEDED',
    'NOT_FOUND',
    'ALREADY_EXISTS',
    'PERMISSION_DENIED',
    'RESOURCE_EXHAUSTED',
    'FAILED_PRECONDITION',
    'ABORTED',
    'OUT_OF_RANGE',
    'UNIMPLEMENTED',
    'INTERNAL',
    'UNAVAILABLE',
    'DATA_LOSS',
    'UNAUTHENTICATED',
  ][code] ?? String(code);

/**
 * The whole mesh for scheduler tests: nats-server, N sanlock-backed hosts with every per-host
 * service, one scheduler (more replicas on demand), io_timeout 1 s, an event recorder.
 */
export class SchedulerMesh {
  readonly dir = makeTestDir('scheduler');
  readonly mesh: LocalMesh;
  readonly events: Array<{ subject: string; event: pb.Event }> = [];
  readonly replicas: RunningService[] = [];
  api!: PublicApi;
  private watcher?: NatsConnection;

  constructor(
    private readonly hostCount = 3,
    private readonly schedulerEnv: NodeJS.ProcessEnv = {},
    /** Extra environment of every host service (e.g. SDMESH_GRACE_MS for the GC). */
    hostEnv: NodeJS.ProcessEnv = {},
  ) {
    this.mesh = new LocalMesh({
      dir: this.dir,
      hosts: hostCount,
      scheduler: false,
      env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', ...hostEnv },
      logLevel: 'debug',
    });
  }

  async start(): Promise<this> {
    await this.mesh.start();
    this.watcher = await connect(this.mesh.nats.connectOptions('sdmctl'));
    subscribeEvents(this.watcher, (event, subject) => this.events.push({ subject, event }));
    const first = await this.startScheduler('scheduler-1');
    this.api = this.publicApi(first.grpcAddress);
    await this.waitHealthy(this.hostCount);
    return this;
  }

  /** The public API of a replica as a user of the mesh (default: admin). */
  publicApi(address: string, user: keyof typeof LOCAL_USERS = 'admin'): PublicApi {
    return publicApi(address, this.mesh.credentials({ kind: 'user', name: user }));
  }

  /** Starts a scheduler replica (same KV unless env says otherwise). */
  async startScheduler(name: string, env: NodeJS.ProcessEnv = {}, args: string[] = []): Promise<RunningService> {
    const s = await startService('scheduler', {
      host: name,
      env: this.mesh.schedulerEnv({
        SDMESH_LOG_LEVEL: 'debug',
        SDMESH_IO_TIMEOUT: '1',
        SDMESH_EVENT_HEARTBEAT_MS: '0',
        SDMESH_HOSTS: this.mesh.hostsSpec(),
        SDMESH_TAKEOVER_MS: '3000',
        SDMESH_HOST_POLL_MS: '500',
        ...this.schedulerEnv,
        ...env,
      }),
      args,
      logFile: path.join(this.mesh.logDir, `${name}.log`),
    });
    this.replicas.push(s);
    return s;
  }

  /** Starts again (same port) every data-mover a test killed, as its supervisor would; then waits for `healthy` hosts. */
  async restartDeadDataMovers(healthy: number, api = this.api): Promise<void> {
    for (const h of this.mesh.hosts) {
      const old = h.services['data-mover'];
      if (!old || old.process.running()) continue;
      await old.process.exited;
      h.services['data-mover'] = await startService('data-mover', {
        host: h.name,
        env: this.mesh.hostServiceEnv(h, 'data-mover', { SDMESH_GRPC_PORT: old.grpcAddress.split(':').pop()! }),
        logFile: path.join(this.mesh.logDir, `${h.name}-data-mover-restarted.log`),
      });
    }
    await this.waitHealthy(healthy, api);
  }

  async waitHealthy(n: number, api = this.api): Promise<void> {
    // Generous: at mesh start every service of every host is still warming up on a busy machine.
    const until = Date.now() + 90_000;
    for (;;) {
      const { hosts } = await api.hosts.listHosts({});
      if (hosts.filter((h) => h.healthy).length >= n) return;
      if (Date.now() > until) throw new Error(`hosts not healthy: ${JSON.stringify(hosts.map((h) => [h.name, h.healthy]))}`);
      await new Promise((r) => setTimeout(r, 300));
    }
  }

  /** Waits for an operation to end (polling WaitOperation). */
  async wait(name: string, api = this.api, timeoutMs = 170_000): Promise<pb.Operation> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const op = await api.ops.waitOperation({ name, timeoutSeconds: 5 }, { timeoutMs: 10_000 }).catch((err: unknown) => {
        if (Date.now() > until) throw err;
        return undefined; // the replica may be restarting
      });
      if (
        op &&
        [pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED].includes(op.status)
      )
        return op;
      if (Date.now() > until) throw new Error(`operation ${name} did not end: ${JSON.stringify(op && pb.Operation.toJSON(op))}`);
      if (!op) await new Promise((r) => setTimeout(r, 500));
    }
  }

  async done(p: Promise<pb.Operation>, api = this.api): Promise<pb.Operation> {
    const op = await this.wait((await p).name, api);
    if (op.status !== pb.OperationStatus.OPERATION_STATUS_DONE) throw new Error(`operation failed: ${JSON.stringify(pb.Operation.toJSON(op))}`);
    return op;
  }

  async createDomain(name: string, extra: Partial<pb.CreateStorageDomainRequest> = {}, api = this.api): Promise<pb.StorageDomain> {
    const op = await this.done(
      api.domains.createStorageDomain({ requestId: `create-${name}`, name, path: path.join(this.mesh.storageDir, name), ...extra }),
      api,
    );
    if (op.result?.$case !== 'storageDomain') throw new Error('no domain in result');
    return op.result.storageDomain;
  }

  async createDisk(domainId: string, capacity: number, requestId: string, extra: Partial<pb.CreateDiskRequest> = {}, api = this.api): Promise<pb.Disk> {
    const op = await this.done(api.disks.createDisk({ requestId, storageDomainId: domainId, capacityBytes: capacity, ...extra }), api);
    if (op.result?.$case !== 'disk') throw new Error('no disk in result');
    return op.result.disk;
  }

  operationEvents(name: string): pb.OperationEvent[] {
    return this.events.flatMap(({ event }) =>
      event.payload?.$case === 'operation' && event.payload.operation.operationName === name ? [event.payload.operation] : [],
    );
  }

  hostOf(name: string) {
    return this.mesh.hosts.find((h) => h.name === name)!;
  }

  /** GC passes of host `host` (1-based) on a domain until it lists no garbage; the items removed. */
  async collectUntilClean(domainPath: string, host = 1): Promise<number> {
    const gc = createClient(pb.GcServiceDefinition, this.mesh.hosts[host - 1]!.services.gc!.grpcAddress, this.mesh.credentials({ kind: 'scheduler' }));
    try {
      let removed = 0;
      for (let i = 0; i < 20; i++) {
        const { passes } = await gc.collectGarbage({ domainPath }, { timeoutMs: 120_000 });
        removed += passes.reduce((s, p) => s + p.itemsRemoved, 0);
        if ((await gc.listGarbage({ domainPath })).items.length === 0) return removed;
        await new Promise((r) => setTimeout(r, 500));
      }
      throw new Error(`garbage left: ${JSON.stringify((await gc.listGarbage({ domainPath })).items.map((i) => i.relativePath))}`);
    } finally {
      gc.close();
    }
  }

  /** kill -9 every process of a host: its services and its sanlock daemon (as a power loss). */
  async killHost(name: string): Promise<void> {
    const h = this.hostOf(name);
    for (const s of Object.values(h.services)) if (s?.process.running()) process.kill(s.process.pid, 'SIGKILL');
    if (h.sanlock.pid > 0) process.kill(h.sanlock.pid, 'SIGKILL');
    await Promise.all(Object.values(h.services).map((s) => s?.process.exited));
  }

  async metrics(service: RunningService): Promise<string> {
    return (await fetch(`http://127.0.0.1:${service.metricsPort}/metrics`)).text();
  }

  async stop(): Promise<void> {
    this.api?.close();
    await this.watcher?.close().catch(() => undefined);
    await Promise.all(this.replicas.map((r) => r.process.stop('SIGTERM', 10_000)));
    await this.mesh.stop().catch(() => undefined);
    removeTestDir(this.dir);
  }
}

/** sha256 of a file's bytes. */
export function sha256File(file: string): string {
  return execFileSync('sha256sum', [file]).toString().split(' ')[0]!;
}

/** Writes random data into a raw file at offsetMiB (as a guest would). */
export function writeRandom(file: string, offsetMiB: number, countMiB: number): void {
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `count=${countMiB}`, `seek=${offsetMiB}`, 'conv=notrunc', 'status=none']);
}

/** Writes a pattern into a qcow2 volume through qemu-io (its backing chain stays as it is). */
export function writeQcow2(file: string, offsetMiB: number, countMiB: number, pattern = 0x5a): void {
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${pattern} ${offsetMiB}M ${countMiB}M`, file], { stdio: 'ignore' });
}

export const exists = (p: string) => fs.existsSync(p);
