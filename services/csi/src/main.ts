#!/usr/bin/env node
import os from 'node:os';
import {
  Authorizer,
  commonOptions,
  ConfigError,
  createLogger,
  GrpcServer,
  loadConfigOrExit,
  MeshTls,
  ServiceMetrics,
  type RegisteredService,
} from '@sdmesh/common';
import { createControllerService } from './controller';
import { csiSocketPath } from './endpoint';
import { identityService } from './identity-service';
import { createNodeService } from './node';
import type { PluginContext } from './plugin';

const options = {
  mode: { type: 'enum', choices: ['controller', 'node'], description: 'Which CSI plugin this process is.', required: true },
  csiEndpoint: {
    type: 'string',
    description: 'CSI socket the orchestrator calls: unix:///<absolute path>.',
    env: 'CSI_ENDPOINT',
    default: 'unix:///csi/csi.sock',
  },
  hostName: commonOptions.hostName,
  nodeId: { type: 'string', description: 'CSI node id reported by NodeGetInfo (node mode; default: the host name).', default: '' },
  schedulerAddress: {
    type: 'string',
    description: "Address of the scheduler's public API (host:port), called with this workload's certificate (controller: a user with role operator).",
    default: '',
  },
  leaseManagerAddress: { type: 'string', description: "This host's lease-manager unix socket (node mode).", default: '' },
  stateDir: { type: 'string', description: "Directory of the node plugin's state (per-volume daemons and sockets).", default: '/var/lib/sdmesh-csi' },
  metricsHost: { type: 'string', description: 'Address the /metrics and /healthz HTTP server binds to.', default: '127.0.0.1' },
  metricsPort: commonOptions.metricsPort,
  logLevel: commonOptions.logLevel,
  shutdownGraceMs: commonOptions.shutdownGraceMs,
  tlsCa: commonOptions.tlsCa,
  tlsCert: commonOptions.tlsCert,
  tlsKey: commonOptions.tlsKey,
  tlsReloadMs: commonOptions.tlsReloadMs,
  insecure: commonOptions.insecure,
} as const;

/**
 * sdmesh-csi: the CSI plugin csi.sdmesh.io. gRPC on the CSI unix socket only (callers are this
 * host's processes: kubelet, the sidecars; identified by SO_PEERCRED), /metrics and /healthz
 * over HTTP, and the scheduler's public API over mTLS as a client.
 */
async function main(): Promise<void> {
  const config = loadConfigOrExit(
    'csi',
    'csi: the CSI driver csi.sdmesh.io (Identity + Controller, or Identity + Node).',
    options,
    process.argv.slice(2),
    process.env,
  );
  const hostName = config.hostName || os.hostname();
  const mode = config.mode as 'controller' | 'node';
  const name = `csi-${mode}`;
  const log = createLogger(name, config.logLevel, hostName);
  let socketPath: string;
  let tls: MeshTls;
  try {
    socketPath = csiSocketPath(config.csiEndpoint);
    if (mode === 'controller' && !config.schedulerAddress) throw new ConfigError('--scheduler-address is required in controller mode');
    if (mode === 'node' && !config.leaseManagerAddress) throw new ConfigError('--lease-manager-address is required in node mode');
    // The node plugin calls nothing over the network (its lease-manager is a unix socket): no certificate.
    tls = mode === 'node' && !config.tlsCert ? MeshTls.insecureMode() : MeshTls.fromConfig(config, log);
  } catch (err) {
    process.stderr.write(`sdmesh-csi: error: ${(err as Error).message}\n`);
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
  const metrics = new ServiceMetrics(name, hostName);
  const ctx: PluginContext = {
    hostName,
    nodeId: config.nodeId || hostName,
    schedulerAddress: config.schedulerAddress,
    leaseManagerAddress: config.leaseManagerAddress,
    stateDir: config.stateDir,
    tls,
    log,
    metrics,
  };

  let server: GrpcServer;
  let plugin: { service: RegisteredService; stop(): Promise<void> };
  let metricsPort: number;
  try {
    plugin = mode === 'controller' ? await createControllerService(ctx) : await createNodeService(ctx);
    const services = [identityService(mode, () => server.serving), plugin.service];
    server = new GrpcServer({
      serviceName: name,
      host: '',
      port: 0,
      tcp: false,
      localSocket: socketPath,
      services,
      log,
      metrics,
      tls,
      authorizer: new Authorizer({ insecure: false }),
      reflection: false,
    });
    await server.start();
    metrics.healthy = () => server.serving;
    metricsPort = await metrics.listen(config.metricsPort, config.metricsHost);
  } catch (err) {
    log.fatal({ err: err instanceof Error ? err.message : String(err) }, 'csi plugin failed to start');
    process.stderr.write(`sdmesh-csi: error: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  // Launchers wait for this line, so it is printed whatever the log level.
  const ready = { mode, endpoint: `unix://${socketPath}`, metricsPort };
  if (log.isLevelEnabled('info')) log.info(ready, 'ready');
  else process.stdout.write(JSON.stringify({ level: 'info', service: name, host: hostName, msg: 'ready', ...ready }) + '\n');

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) process.exit(1);
    stopping = true;
    log.info({ signal }, 'shutting down');
    await server.shutdown(config.shutdownGraceMs);
    await plugin.stop().catch((err) => log.error({ err }, 'error while stopping'));
    await metrics.close();
    log.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}

void main();
