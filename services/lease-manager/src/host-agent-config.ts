import os from 'node:os';
import { HostAgent, sameIdentity, type Logger, type MeshTls } from '@sdmesh/common';
import type { LeaseManager } from './lease-manager';

/** Options of the lease-manager that start its HostAgent (docs/scheduler.md, "Heartbeats"). */
export const hostAgentOptions = {
  schedulerAddress: {
    type: 'string',
    default: '',
    description:
      'Scheduler replicas (host:port, comma-separated, tried in turn) to send heartbeats to. Empty: no heartbeats (the scheduler then needs SDMESH_HOSTS).',
  },
  heartbeatIntervalMs: { type: 'int', default: 5000, min: 200, description: 'How often this host announces itself to the scheduler.' },
  advertiseAddress: {
    type: 'string',
    default: '',
    description:
      "Host part of the addresses announced for this host's services (default: the gRPC bind host, or this machine's hostname when that is 0.0.0.0).",
  },
  metadataTxAddress: {
    type: 'string',
    env: 'SDMESH_METADATA_TX_ADDRESS',
    default: '',
    description: "This host's metadata-tx gRPC address (its port is announced with the advertise host).",
  },
  dataMoverAddress: {
    type: 'string',
    env: 'SDMESH_DATA_MOVER_ADDRESS',
    default: '',
    description: "This host's data-mover gRPC address (its port is announced with the advertise host).",
  },
  gcAddress: {
    type: 'string',
    env: 'SDMESH_GC_ADDRESS',
    default: '',
    description: "This host's gc gRPC address (its port is announced with the advertise host; may be empty).",
  },
} as const;

interface Config {
  schedulerAddress: string;
  heartbeatIntervalMs: number;
  advertiseAddress: string;
  metadataTxAddress: string;
  dataMoverAddress: string;
  gcAddress: string;
  grpcHost: string;
  grpcPort: number;
  hostId: number;
}

const portOf = (what: string, address: string): string => {
  const m = /:(\d{1,5})$/.exec(address);
  if (!m || Number(m[1]) === 0) throw new Error(`${what} "${address}" must end in :<port>`);
  return m[1]!;
};

/**
 * The HostAgent for this lease-manager, or undefined without --scheduler-address. In a pod the
 * services listen on the pod's ports and reach each other over loopback, so only their ports
 * are taken from SDMESH_*_ADDRESS; the host part announced is --advertise-address (the pod IP).
 */
export function makeHostAgent(config: Config, hostName: string, manager: LeaseManager, tls: MeshTls, log: Logger): HostAgent | undefined {
  const schedulers = config.schedulerAddress
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (schedulers.length === 0) return undefined;
  if (!config.grpcPort) throw new Error('heartbeats need a fixed --grpc-port (the scheduler must be able to dial this lease-manager)');
  if (!config.metadataTxAddress || !config.dataMoverAddress) {
    throw new Error("heartbeats need SDMESH_METADATA_TX_ADDRESS and SDMESH_DATA_MOVER_ADDRESS (the ports of this host's services)");
  }
  const host = config.advertiseAddress || (config.grpcHost === '0.0.0.0' || config.grpcHost === '::' ? os.hostname() : config.grpcHost);
  const advertise = (what: string, address: string) => (address ? `${host}:${portOf(what, address)}` : '');
  const addresses = {
    leaseManager: `${host}:${config.grpcPort}`,
    metadataTx: advertise('SDMESH_METADATA_TX_ADDRESS', config.metadataTxAddress),
    dataMover: advertise('SDMESH_DATA_MOVER_ADDRESS', config.dataMoverAddress),
    gc: advertise('SDMESH_GC_ADDRESS', config.gcAddress),
  };
  log.info({ schedulers, addresses, intervalMs: config.heartbeatIntervalMs }, 'heartbeats to the scheduler enabled');
  return new HostAgent({
    schedulerAddresses: schedulers,
    hostName,
    hostId: config.hostId,
    intervalMs: config.heartbeatIntervalMs,
    addresses,
    // Heartbeats go only to a scheduler: a proxy with some other mesh certificate gets nothing.
    credentials: tls.channelCredentials(sameIdentity({ kind: 'scheduler' })),
    log,
    lockspaces: {
      list: () => manager.listLockspaces(),
      join: (req) => manager.joinAnnounced({ name: req.name, path: req.path, hostId: req.hostId, ioTimeout: req.ioTimeoutSeconds, epoch: req.epoch }),
      leave: (req) => manager.leaveLockspace(req.name, false, req.epoch),
    },
  });
}
