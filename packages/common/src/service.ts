import os from 'node:os';
import { commonOptions, ConfigError, HelpRequested, parseConfig, type ConfigSpec, type ConfigValues } from './config';
import { GrpcServer, type RegisteredService } from './grpc';
import { leaseFramesSocketPath } from './lease-frames';
import { createLogger, type Logger } from './logger';
import { ServiceMetrics } from './metrics';
import { ServiceEvent_Kind } from './gen/sdmesh/v1/events';
import { Authorizer, type RolesFile } from './authz';
import { MeshTls } from './tls';
import { connectNats, EventPublisher, natsAuthOrExit, type NatsConnection } from './nats';

export type CommonConfig = ConfigValues<typeof commonOptions>;

export interface ServiceContext<S extends ConfigSpec> {
  config: ConfigValues<S> & CommonConfig;
  hostName: string;
  log: Logger;
  metrics: ServiceMetrics;
  events: EventPublisher;
  /** This workload's mTLS credentials, for its server and every client it creates. */
  tls: MeshTls;
  /** Resolves once NATS is connected (it may be down when the service starts). */
  nats: Promise<NatsConnection>;
}

export interface StartedService {
  services: RegisteredService[];
  /** Called after the gRPC server drained: release resources, stop timers. */
  stop?: () => Promise<void>;
  /** Also serve on this unix socket, for this host's processes (see GrpcServer). */
  localSocket?: string;
  /** Also serve the lease frame socket next to `localSocket` (lease-frames.ts: the lease-manager's hot lease calls). */
  leaseFrames?: boolean;
  /** Roles of user identities (the scheduler's public API). */
  roles?: RolesFile;
}

export interface ServiceDescription<S extends ConfigSpec> {
  name: string;
  summary: string;
  options: S;
  start(ctx: ServiceContext<S>): Promise<StartedService>;
}

/** Parses config or prints help / a one-line error and exits. */
export function loadConfigOrExit<S extends ConfigSpec>(
  name: string,
  summary: string,
  spec: S,
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
): ConfigValues<S> {
  try {
    return parseConfig(spec, argv, env, `sdmesh-${name}`, summary);
  } catch (err) {
    if (err instanceof HelpRequested) {
      process.stdout.write(err.text + '\n');
      process.exit(0);
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`sdmesh-${name}: error: ${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}

/**
 * Runs one sdmesh service: config, logger, metrics endpoint, gRPC server with health and
 * reflection, NATS (reconnecting in the background), and graceful shutdown on SIGTERM/SIGINT.
 * Each service's main.ts is a call to this.
 */
export async function runService<S extends ConfigSpec>(
  desc: ServiceDescription<S>,
  argv: readonly string[] = process.argv.slice(2),
  env: NodeJS.ProcessEnv = process.env,
): Promise<void> {
  const spec = { ...commonOptions, ...desc.options };
  const config = loadConfigOrExit(desc.name, desc.summary, spec, argv, env) as ConfigValues<S> & CommonConfig;
  const hostName = config.hostName || os.hostname();
  const log = createLogger(desc.name, config.logLevel, hostName);
  let tls: MeshTls;
  try {
    tls = MeshTls.fromConfig(config, log);
  } catch (err) {
    process.stderr.write(`sdmesh-${desc.name}: error: ${(err as Error).message}\n`);
    process.exit(2);
  }
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception');
    process.exit(1);
  });
  process.on('unhandledRejection', (err) => {
    log.fatal({ err }, 'unhandled promise rejection');
    process.exit(1);
  });

  const metrics = new ServiceMetrics(desc.name, hostName);
  const events = new EventPublisher(undefined, { host: hostName, service: desc.name }, log);
  let natsConnection: NatsConnection | undefined;
  const nats = connectNats({ url: config.natsUrl, name: `${desc.name}@${hostName}`, log, auth: natsAuthOrExit(desc.name, config) }).then((nc) => {
    natsConnection = nc;
    events.attach(nc);
    log.info({ url: config.natsUrl }, 'NATS connected');
    return nc;
  });
  nats.catch((err) => log.error({ err: String(err) }, 'NATS connection failed'));

  let started: StartedService;
  let grpcServer: GrpcServer;
  let grpcPort: number;
  let metricsPort: number;
  try {
    started = await desc.start({ config, hostName, log, metrics, events, tls, nats });
    grpcServer = new GrpcServer({
      serviceName: desc.name,
      host: config.grpcHost,
      port: config.grpcPort,
      services: started.services,
      log,
      metrics,
      tls,
      authorizer: new Authorizer({ insecure: tls.insecure, roles: started.roles }),
      localSocket: started.localSocket,
      leaseFramesSocket: started.leaseFrames && started.localSocket ? leaseFramesSocketPath(started.localSocket) : undefined,
      reflection: config.grpcReflection,
      maxConnectionAgeMs: config.grpcMaxConnectionAgeMs,
      maxConnectionAgeGraceMs: config.grpcMaxConnectionAgeGraceMs,
    });
    grpcPort = await grpcServer.start();
    // GET /healthz on the metrics port mirrors gRPC health, for probes that can't do mTLS (kubelet).
    const server = grpcServer;
    metrics.healthy = () => server.serving;
    metricsPort = await metrics.listen(config.metricsPort, config.grpcHost);
  } catch (err) {
    log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'service failed to start');
    process.stderr.write(`sdmesh-${desc.name}: error: ${err instanceof Error ? err.message : String(err)}\n`);
    // A service's own check of its options (one against another) is bad configuration too.
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  const address = `${config.grpcHost}:${grpcPort}`;
  // Launchers wait for this line, so it is printed whatever the log level.
  if (log.isLevelEnabled('info')) log.info({ grpcPort, metricsPort, address }, 'ready');
  else process.stdout.write(JSON.stringify({ level: 'info', service: desc.name, host: hostName, msg: 'ready', grpcPort, metricsPort, address }) + '\n');
  events.publish({ $case: 'service', service: { kind: ServiceEvent_Kind.KIND_STARTED, service: desc.name, address } });
  const heartbeat =
    config.eventHeartbeatMs > 0
      ? setInterval(
          () => events.publish({ $case: 'service', service: { kind: ServiceEvent_Kind.KIND_HEARTBEAT, service: desc.name, address } }),
          config.eventHeartbeatMs,
        )
      : undefined;

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) {
      log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, 'shutting down');
    clearInterval(heartbeat);
    events.publish({ $case: 'service', service: { kind: ServiceEvent_Kind.KIND_STOPPING, service: desc.name, address } });
    await grpcServer.shutdown(config.shutdownGraceMs);
    await started.stop?.().catch((err) => log.error({ err }, 'error while stopping'));
    await metrics.close();
    if (natsConnection) await natsConnection.drain().catch(() => undefined);
    log.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}
