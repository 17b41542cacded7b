import fs from 'node:fs';
import path from 'node:path';
import { NatsServer } from './nats-server';
import { LocalPki } from './pki';
import { freePort } from './processes';
import { SanlockDaemon } from './sanlock-daemon';
import { startService, type RunningService, type ServiceName } from './service-process';

export const PER_HOST_SERVICES = ['lease-manager', 'metadata-tx', 'data-mover', 'gc'] as const satisfies readonly ServiceName[];

export interface MeshHost {
  name: string;
  hostId: number;
  sanlock: SanlockDaemon;
  services: Partial<Record<ServiceName, RunningService>>;
}

export interface LocalMeshOptions {
  /** Working directory: logs, sanlock run dirs, NATS store, and `storage/` (the shared storage). */
  dir: string;
  hosts?: number;
  /** Extra environment for every service. */
  env?: NodeJS.ProcessEnv;
  logLevel?: string;
  /** Start only these per-host services (default: all). */
  perHostServices?: readonly ServiceName[];
  scheduler?: boolean;
  /**
   * Hosts announce themselves with HostService.Heartbeat (their lease-manager's HostAgent)
   * instead of the scheduler reading SDMESH_HOSTS. Service ports are picked up front so the
   * lease-manager knows them. `schedulerAddress` defaults to the mesh's own scheduler.
   */
  heartbeats?: { intervalMs?: number; schedulerAddress?: string };
}

/**
 * The whole mesh on one machine: a nats-server, N simulated hosts (a sanlock daemon plus
 * lease-manager, metadata-tx, data-mover and gc each), and a scheduler, with a local
 * directory as shared storage.
 */
export class LocalMesh {
  readonly nats: NatsServer;
  readonly hosts: MeshHost[] = [];
  scheduler?: RunningService;
  readonly storageDir: string;
  readonly logDir: string;

  constructor(readonly opts: LocalMeshOptions) {
    this.storageDir = path.join(opts.dir, 'storage');
    this.logDir = path.join(opts.dir, 'logs');
    // One NATS user per host (shared by its services), the scheduler, and sdmctl (a reader).
    const hostNames = Array.from({ length: opts.hosts ?? 3 }, (_, i) => `host${i + 1}`);
    this.nats = new NatsServer(path.join(opts.dir, 'nats'), { hosts: hostNames, pki: new LocalPki(path.join(opts.dir, 'pki')) });
  }

  private serviceEnv(natsUser: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      ...this.nats.clientEnv(natsUser),
      SDMESH_TLS_CA: this.nats.caFile,
      SDMESH_LOG_LEVEL: this.opts.logLevel ?? 'info',
      SDMESH_STORAGE_ROOT: this.storageDir,
      ...this.opts.env,
      ...extra,
    };
  }

  async start(onProgress: (msg: string) => void = () => undefined): Promise<this> {
    for (const d of [this.opts.dir, this.storageDir, this.logDir]) fs.mkdirSync(d, { recursive: true });
    try {
      await this.nats.start();
      onProgress(`nats-server on ${this.nats.url}`);
      const n = this.opts.hosts ?? 3;
      const hb = this.opts.heartbeats;
      const schedulerPort = hb && (this.opts.scheduler ?? true) ? await freePort() : 0;
      for (let i = 1; i <= n; i++) {
        const name = `host${i}`;
        const sanlock = await new SanlockDaemon(name, path.join(this.opts.dir, 'hosts', name, 'sanlock')).start();
        onProgress(`${name}: sanlock daemon (pid ${sanlock.pid})`);
        const host: MeshHost = { name, hostId: i, sanlock, services: {} };
        this.hosts.push(host);
        const services = this.opts.perHostServices ?? PER_HOST_SERVICES;
        const ports: Partial<Record<ServiceName, number>> = {};
        if (hb) for (const svc of services) ports[svc] = await freePort();
        const at = (svc: ServiceName) => (ports[svc] ? `127.0.0.1:${ports[svc]}` : '');
        for (const svc of services) {
          const announce: NodeJS.ProcessEnv =
            hb && svc === 'lease-manager'
              ? {
                  SDMESH_SCHEDULER_ADDRESS: hb.schedulerAddress ?? `127.0.0.1:${schedulerPort}`,
                  SDMESH_HEARTBEAT_INTERVAL_MS: String(hb.intervalMs ?? 1000),
                  SDMESH_METADATA_TX_ADDRESS: at('metadata-tx'),
                  SDMESH_DATA_MOVER_ADDRESS: at('data-mover'),
                  SDMESH_GC_ADDRESS: at('gc'),
                }
              : {};
          host.services[svc] = await startService(svc, {
            host: name,
            env: this.serviceEnv(name, {
              ...sanlock.env,
              SDMESH_HOST_ID: String(i),
              SDMESH_LEASE_MANAGER_ADDRESS: host.services['lease-manager']?.grpcAddress ?? '',
              ...(ports[svc] ? { SDMESH_GRPC_PORT: String(ports[svc]) } : {}),
              ...announce,
            }),
            logFile: path.join(this.logDir, `${name}-${svc}.log`),
          });
          onProgress(`${name}: ${svc} on ${host.services[svc]!.grpcAddress}`);
        }
      }
      if (this.opts.scheduler ?? true) {
        this.scheduler = await startService('scheduler', {
          host: 'scheduler-1',
          env: this.serviceEnv('scheduler', hb ? { SDMESH_GRPC_PORT: String(schedulerPort) } : { SDMESH_HOSTS: this.hostsSpec() }),
          logFile: path.join(this.logDir, 'scheduler.log'),
        });
        onProgress(`scheduler on ${this.scheduler.grpcAddress}`);
      }
    } catch (err) {
      await this.stop();
      throw err;
    }
    return this;
  }

  /**
   * The hosts as the scheduler's SDMESH_HOSTS wants them: each host's service addresses, and
   * its metadata-tx pid (a registered sanlock holder the SPM lease can be acquired for).
   */
  hostsSpec(): string {
    return JSON.stringify(
      this.hosts.map((h) => ({
        name: h.name,
        hostId: h.hostId,
        leaseManager: h.services['lease-manager']?.grpcAddress ?? '',
        metadataTx: h.services['metadata-tx']?.grpcAddress ?? '',
        dataMover: h.services['data-mover']?.grpcAddress ?? '',
        gc: h.services.gc?.grpcAddress ?? '',
        spmHolderPid: h.services['metadata-tx']?.process.pid ?? 0,
      })),
    );
  }

  /** Every running service, scheduler last. */
  services(): RunningService[] {
    const all = this.hosts.flatMap((h) => Object.values(h.services).filter((s): s is RunningService => !!s));
    return this.scheduler ? [...all, this.scheduler] : all;
  }

  /** Graceful stop: services (SIGTERM), then sanlock daemons, then nats-server. */
  async stop(): Promise<void> {
    await Promise.all(this.services().map((s) => s.process.stop('SIGTERM', 15000)));
    await Promise.all(this.hosts.map((h) => h.sanlock.stop()));
    await this.nats.stop();
  }
}
