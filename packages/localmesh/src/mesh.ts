import fs from 'node:fs';
import path from 'node:path';
import type { ChannelCredentials } from '@grpc/grpc-js';
import { MeshTls, type HostServiceName, type Identity } from '@sdmesh/common';
import { CSI_CONTROLLER_USER, startCsiPlugin, type RunningCsiPlugin } from './csi';
import { NatsCluster, NatsServer } from './nats-server';
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
  /** Its CSI node plugin (with the `csi` option). */
  csiNode?: RunningCsiPlugin;
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
  /** Scheduler replicas (default 1); each takes over the operations of one that dies. */
  schedulers?: number;
  /**
   * NATS nodes (default 1). More than one: a NatsCluster on loopback, every service given every
   * node's URL, and the scheduler keeping `natsReplicas` copies (default: min(nodes, 3)).
   */
  natsNodes?: number;
  natsReplicas?: number;
  /**
   * Restart a service process that dies (not stopped by stop()), after a backoff that doubles
   * on each quick death (as Kubernetes restarts a container): `true` for the defaults.
   */
  restart?: boolean | RestartPolicy;
  /** Told about every death and restart of a supervised process. */
  onSupervisorEvent?: (event: SupervisorEvent) => void;
  /**
   * The CSI driver (issue 18): the controller (a user certificate with role operator, calling the
   * first scheduler) and one node plugin per host, on unix sockets under `<dir>/csi/`.
   */
  csi?: boolean;
  /** Every log line of every service (JSON), e.g. to show a scheduler replica's takeovers. */
  onServiceLine?: (service: ServiceName, host: string, line: string) => void;
}

export interface RestartPolicy {
  /** First delay before a restart (default 500 ms); doubles after each quick death. */
  initialBackoffMs?: number;
  /** Longest delay (default 10 s). */
  maxBackoffMs?: number;
  /** A process that ran this long before dying restarts after the first delay again (default 10 s). */
  resetAfterMs?: number;
}

/** What the supervisor did: a process died, is restarted after `delayMs`, or failed to restart. */
export type SupervisorEvent =
  | { kind: 'died'; service: ServiceName; host: string; pid: number; exit: number | string; delayMs: number }
  | { kind: 'restarted'; service: ServiceName; host: string; pid: number; restarts: number }
  | { kind: 'restart-failed'; service: ServiceName; host: string; error: string };

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
  readonly nats: NatsServer | NatsCluster;
  readonly hosts: MeshHost[] = [];
  /** The scheduler replicas (a restarted replica replaces its entry, same address). */
  readonly schedulers: RunningService[] = [];
  /** Restarts of supervised processes so far, by "<host>/<service>". */
  readonly restarts = new Map<string, number>();
  private stopping = false;
  readonly storageDir: string;
  readonly logDir: string;
  /** The mesh's CA and every workload's certificate (`<dir>/pki`, keys 0600). */
  readonly pki: LocalPki;
  /** Roles of the user certificates (the scheduler's --roles-file). */
  readonly rolesFile: string;
  /** The CSI controller plugin (with the `csi` option). */
  csiController?: RunningCsiPlugin;

  constructor(readonly opts: LocalMeshOptions) {
    this.storageDir = path.join(opts.dir, 'storage');
    this.logDir = path.join(opts.dir, 'logs');
    // One NATS user per host (shared by its services), the scheduler, and sdmctl (a reader).
    const hostNames = Array.from({ length: opts.hosts ?? 3 }, (_, i) => `host${i + 1}`);
    this.pki = new LocalPki(path.join(opts.dir, 'pki'));
    this.rolesFile = path.join(opts.dir, 'roles.json');
    const natsOptions = { hosts: hostNames, pki: this.pki };
    this.nats =
      (opts.natsNodes ?? 1) > 1
        ? new NatsCluster(path.join(opts.dir, 'nats'), { ...natsOptions, nodes: opts.natsNodes })
        : new NatsServer(path.join(opts.dir, 'nats'), natsOptions);
  }

  /** The first scheduler replica (the one tests and tools talk to unless they take them all). */
  get scheduler(): RunningService | undefined {
    return this.schedulers[0];
  }

  /** Every scheduler replica's address, comma-separated (sdmctl's --address takes them all). */
  get schedulerAddresses(): string {
    return this.schedulers.map((s) => s.grpcAddress).join(',');
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

  /** The environment of a scheduler replica: NATS user and replicas, certificate, roles file. */
  schedulerEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    const natsNodes = this.opts.natsNodes ?? 1;
    return this.serviceEnv('scheduler', {
      ...this.tlsEnv({ kind: 'scheduler' }),
      ...(this.opts.insecure ? {} : { SDMESH_ROLES_FILE: this.rolesFile }),
      SDMESH_NATS_REPLICAS: String(this.opts.natsReplicas ?? Math.min(natsNodes, 3)),
      ...extra,
    });
  }

  /**
   * Starts a service and, with `restart`, keeps it running: when the process dies (not through
   * stop()), it is started again with the same environment and the same ports (so every
   * address the others know stays right), after a backoff. `place` puts the running service
   * where the mesh keeps it (host.services, schedulers), at the start and after each restart.
   */
  private async startSupervised(
    name: ServiceName,
    host: string,
    env: NodeJS.ProcessEnv,
    logFile: string,
    place: (svc: RunningService) => void,
  ): Promise<RunningService> {
    const onLine = this.opts.onServiceLine ? (line: string) => this.opts.onServiceLine!(name, host, line) : undefined;
    const first = await startService(name, { host, env, logFile, onLine });
    place(first);
    const policy = this.opts.restart === true ? {} : this.opts.restart;
    if (!policy) return first;
    const initial = policy.initialBackoffMs ?? 500;
    const max = policy.maxBackoffMs ?? 10_000;
    const resetAfter = policy.resetAfterMs ?? 10_000;
    const key = `${host}/${name}`;
    // Same ports after a restart: the scheduler's host list and sdmctl know these addresses.
    const pinned = { ...env, SDMESH_GRPC_PORT: String(first.grpcPort), SDMESH_METRICS_PORT: String(first.metricsPort) };
    let quickDeaths = 0;
    const watch = (svc: RunningService, startedAt: number) => {
      void svc.process.exited.then(async (exit) => {
        if (this.stopping) return;
        quickDeaths = Date.now() - startedAt >= resetAfter ? 1 : quickDeaths + 1;
        for (;;) {
          const delayMs = Math.min(max, initial * 2 ** (quickDeaths - 1));
          this.opts.onSupervisorEvent?.({ kind: 'died', service: name, host, pid: svc.process.pid, exit, delayMs });
          await new Promise((r) => setTimeout(r, delayMs));
          if (this.stopping) return;
          try {
            const next = await startService(name, { host, env: pinned, logFile, onLine });
            if (this.stopping) {
              await next.process.stop('SIGTERM', 15000);
              return;
            }
            place(next);
            const restarts = (this.restarts.get(key) ?? 0) + 1;
            this.restarts.set(key, restarts);
            this.opts.onSupervisorEvent?.({ kind: 'restarted', service: name, host, pid: next.process.pid, restarts });
            watch(next, Date.now());
            return;
          } catch (err) {
            this.opts.onSupervisorEvent?.({ kind: 'restart-failed', service: name, host, error: (err as Error).message });
            quickDeaths++;
          }
        }
      });
    };
    watch(first, Date.now());
    return first;
  }

  async start(onProgress: (msg: string) => void = () => undefined): Promise<this> {
    for (const d of [this.opts.dir, this.storageDir, this.logDir]) fs.mkdirSync(d, { recursive: true });
    if (!this.opts.insecure) {
      this.pki.ensure();
      // The CSI controller's user too (its certificate is issued only when it starts).
      const users = { ...LOCAL_USERS, [CSI_CONTROLLER_USER]: 'operator' };
      fs.writeFileSync(this.rolesFile, JSON.stringify({ users }, null, 2) + '\n', { mode: 0o644 });
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
          const env = this.hostServiceEnv(host, svc as HostServiceName, {
            ...(ports[svc] ? { SDMESH_GRPC_PORT: String(ports[svc]) } : {}),
            ...announce,
          });
          const started = await this.startSupervised(svc, name, env, path.join(this.logDir, `${name}-${svc}.log`), (s) => (host.services[svc] = s));
          onProgress(`${name}: ${svc} on ${started.grpcAddress}`);
        }
      }
      if (this.opts.scheduler ?? true) {
        for (let i = 0; i < (this.opts.schedulers ?? 1); i++) {
          // The first replica keeps the port the hosts' heartbeats were told; others pick one.
          const env = this.schedulerEnv(hb ? { SDMESH_GRPC_PORT: String(i === 0 ? schedulerPort : 0) } : { SDMESH_HOSTS: this.hostsSpec() });
          const logFile = path.join(this.logDir, i === 0 ? 'scheduler.log' : `scheduler-${i + 1}.log`);
          const started = await this.startSupervised('scheduler', `scheduler-${i + 1}`, env, logFile, (s) => (this.schedulers[i] = s));
          onProgress(`scheduler-${i + 1} on ${started.grpcAddress}`);
        }
      }
      if (this.opts.csi) await this.startCsi({ onProgress });
    } catch (err) {
      await this.stop();
      throw err;
    }
    return this;
  }

  /** Socket of a CSI plugin: the controller's, or a host's node plugin's. */
  csiSocket(host?: string): string {
    return path.join(this.opts.dir, 'csi', host ? `${host}.sock` : 'controller.sock');
  }

  /**
   * The CSI controller (calling `schedulerAddress`, default the first replica) and, unless
   * `nodes` is false, a node plugin per host. Not supervised: tests stop and start them themselves.
   */
  async startCsi(opts: { onProgress?: (msg: string) => void; schedulerAddress?: string; nodes?: boolean } = {}): Promise<void> {
    const onProgress = opts.onProgress ?? (() => undefined);
    fs.mkdirSync(path.join(this.opts.dir, 'csi'), { recursive: true, mode: 0o700 });
    const base = { SDMESH_LOG_LEVEL: this.opts.logLevel ?? 'info', SDMESH_STORAGE_ROOTS: this.storageDir, ...this.opts.env };
    this.csiController = await startCsiPlugin('controller', {
      host: 'csi-controller',
      socketPath: this.csiSocket(),
      env: {
        ...base,
        ...this.tlsEnv({ kind: 'user', name: CSI_CONTROLLER_USER }),
        SDMESH_SCHEDULER_ADDRESS: opts.schedulerAddress ?? this.scheduler?.grpcAddress ?? '',
      },
      logFile: path.join(this.logDir, 'csi-controller.log'),
    });
    onProgress(`csi controller on ${this.csiController.endpoint}`);
    for (const host of opts.nodes === false ? [] : this.hosts) {
      host.csiNode = await startCsiPlugin('node', {
        host: host.name,
        socketPath: this.csiSocket(host.name),
        env: {
          ...base,
          ...host.sanlock.env,
          SDMESH_LEASE_MANAGER_ADDRESS: `unix:${this.leaseSocket(host.name)}`,
          SDMESH_STATE_DIR: path.join(this.opts.dir, 'hosts', host.name, 'csi'),
        },
        logFile: path.join(this.logDir, `${host.name}-csi-node.log`),
      });
      onProgress(`${host.name}: csi node on ${host.csiNode.endpoint}`);
    }
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

  /** Every running service, schedulers last. */
  services(): RunningService[] {
    const all = this.hosts.flatMap((h) => Object.values(h.services).filter((s): s is RunningService => !!s));
    return [...all, ...this.schedulers];
  }

  /** Graceful stop: services (SIGTERM, no restarts any more), then sanlock daemons, then nats-server. */
  async stop(): Promise<void> {
    this.stopping = true;
    const csi = [this.csiController, ...this.hosts.map((h) => h.csiNode)].filter((p): p is RunningCsiPlugin => !!p);
    await Promise.all(csi.map((p) => p.process.stop('SIGTERM', 15000)));
    await Promise.all(this.services().map((s) => s.process.stop('SIGTERM', 15000)));
    await Promise.all(this.hosts.map((h) => h.sanlock.stop()));
    await this.nats.stop();
  }
}
