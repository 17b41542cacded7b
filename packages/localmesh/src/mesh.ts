import fs from 'node:fs';
import path from 'node:path';
import type { ChannelCredentials } from '@grpc/grpc-js';
import { MeshTls, type HostServiceName, type Identity } from '@sdmesh/common';
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
  /** Plaintext gRPC with no authentication (--insecure on every service): benchmarks' baseline only. */
  insecure?: boolean;
}

/** Identities that certificates are issued for. */
export type CertifiedIdentity = Exclude<Identity, { kind: 'local' } | { kind: 'insecure' }>;

/** Users of the local mesh's roles file, one per role; `admin` is what sdmctl uses. */
export const LOCAL_USERS = { admin: 'admin', operator: 'operator', viewer: 'viewer' } as const;

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
  /** The mesh's CA and every workload's certificate (`<dir>/pki`, keys 0600). */
  readonly pki: LocalPki;
  /** Roles of the user certificates (the scheduler's --roles-file). */
  readonly rolesFile: string;

  constructor(readonly opts: LocalMeshOptions) {
    this.storageDir = path.join(opts.dir, 'storage');
    this.logDir = path.join(opts.dir, 'logs');
    // One NATS user per host (shared by its services), the scheduler, and sdmctl (a reader).
    const hostNames = Array.from({ length: opts.hosts ?? 3 }, (_, i) => `host${i + 1}`);
    this.pki = new LocalPki(path.join(opts.dir, 'pki'));
    this.rolesFile = path.join(opts.dir, 'roles.json');
    this.nats = new NatsServer(path.join(opts.dir, 'nats'), { hosts: hostNames, pki: this.pki });
  }

  /** SDMESH_TLS_* of an identity's certificate (issued on first use), or SDMESH_INSECURE. */
  tlsEnv(id: CertifiedIdentity): NodeJS.ProcessEnv {
    if (this.opts.insecure) return { SDMESH_INSECURE: 'true' };
    return LocalPki.env(this.pki.forIdentity(id));
  }

  /** mTLS of an identity of this mesh (default: the admin user), for clients in tests and tools. */
  tls(id: CertifiedIdentity = { kind: 'user', name: LOCAL_USERS.admin }): MeshTls {
    if (this.opts.insecure) return MeshTls.insecureMode();
    return MeshTls.fromFiles(this.pki.forIdentity(id));
  }

  /** Client credentials as an identity (default: the admin user). */
  credentials(id?: CertifiedIdentity): ChannelCredentials {
    return this.tls(id).channelCredentials();
  }

  /** Unix socket of a host's lease API. */
  leaseSocket(hostName: string): string {
    return path.join(this.opts.dir, 'hosts', hostName, 'run', 'lease-manager.sock');
  }

  private serviceEnv(natsUser: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      ...this.nats.clientEnv(natsUser),
      SDMESH_TLS_CA: this.nats.caFile,
      SDMESH_LOG_LEVEL: this.opts.logLevel ?? 'info',
      SDMESH_STORAGE_ROOTS: this.storageDir,
      ...this.opts.env,
      ...extra,
    };
  }

  /**
   * The environment of one per-host service of a host: its sanlock daemon, NATS user,
   * certificate, host id and the host's lease socket (also for extra processes tests start).
   */
  hostServiceEnv(host: MeshHost, service: HostServiceName, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return this.serviceEnv(host.name, {
      ...host.sanlock.env,
      ...this.tlsEnv({ kind: 'host', host: host.name, service }),
      SDMESH_HOST_ID: String(host.hostId),
      SDMESH_LEASE_SOCKET: this.leaseSocket(host.name),
      SDMESH_LEASE_MANAGER_ADDRESS: host.services['lease-manager'] || service === 'lease-manager' ? `unix:${this.leaseSocket(host.name)}` : '',
      ...extra,
    });
  }

  /** The environment of a scheduler replica: NATS user, certificate, roles file. */
  schedulerEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return this.serviceEnv('scheduler', {
      ...this.tlsEnv({ kind: 'scheduler' }),
      ...(this.opts.insecure ? {} : { SDMESH_ROLES_FILE: this.rolesFile }),
      ...extra,
    });
  }

  async start(onProgress: (msg: string) => void = () => undefined): Promise<this> {
    for (const d of [this.opts.dir, this.storageDir, this.logDir]) fs.mkdirSync(d, { recursive: true });
    if (!this.opts.insecure) {
      this.pki.ensure();
      fs.writeFileSync(this.rolesFile, JSON.stringify({ users: LOCAL_USERS }, null, 2) + '\n', { mode: 0o644 });
    }
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
            env: this.hostServiceEnv(host, svc as HostServiceName, {
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
          env: this.schedulerEnv(hb ? { SDMESH_GRPC_PORT: String(schedulerPort) } : { SDMESH_HOSTS: this.hostsSpec() }),
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

  /** The hosts as the scheduler's SDMESH_HOSTS wants them: each host's service addresses. */
  hostsSpec(): string {
    return JSON.stringify(
      this.hosts.map((h) => ({
        name: h.name,
        hostId: h.hostId,
        leaseManager: h.services['lease-manager']?.grpcAddress ?? '',
        metadataTx: h.services['metadata-tx']?.grpcAddress ?? '',
        dataMover: h.services['data-mover']?.grpcAddress ?? '',
        gc: h.services.gc?.grpcAddress ?? '',
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
