#!/usr/bin/env node
import { MAX_HOST_ID, pb, runService, service, storageRootsOption, StorageRoots } from '@sdmesh/common';
import { leaseManagerHandlers } from './handlers';
import { hostAgentOptions, makeHostAgent } from './host-agent-config';
import { LeaseManager } from './lease-manager';
import { LeaseMetrics } from './metrics';

void runService({
  name: 'lease-manager',
  summary: 'lease-manager: wraps the sanlock daemon of this host (SANLOCK_RUN_DIR); the only way sdmesh services take cluster-wide leases.',
  options: {
    hostId: { type: 'int', description: 'Default host id of this host in lockspaces (1..250).', required: true, min: 1, max: MAX_HOST_ID },
    ioTimeout: { type: 'int', description: 'Default sanlock io_timeout in seconds for lockspaces joined here.', default: 10, min: 1, max: 60 },
    stateDir: {
      type: 'string',
      description: 'Directory for the held-lease table and the lockspace leave/join orders kept across restarts (empty: not kept).',
      default: '',
    },
    monitorIntervalMs: { type: 'int', description: 'How often holders and lockspaces are checked.', default: 1000, min: 100 },
    leaseSocket: {
      type: 'string',
      description: "Unix socket of the host-local lease API (this host's services connect here; the caller's pid comes from the kernel).",
      default: '/run/sdmesh/lease-manager.sock',
    },
    leaseFrames: {
      type: 'bool',
      description:
        "Also serve the lease frame socket next to the lease socket (<lease socket without .sock>.frames.sock): the lease calls of this host's LeaseHolders as length-prefixed frames instead of gRPC, same peer credentials, authorization and handlers (issue 17).",
      default: true,
    },
    storageRoots: {
      ...storageRootsOption,
      description:
        'Comma-separated absolute directories of shared storage that storage domains may live in: FormatLockspace/FormatLeases only write dom_md areas of domains beneath one. Empty: areas anywhere (still only dom_md/ids and dom_md/leases).',
    },
    ...hostAgentOptions,
  },
  async start({ config, log, events, metrics, hostName, tls }) {
    const roots = new StorageRoots(config.storageRoots, `lease-manager on ${hostName}`);
    const manager = new LeaseManager({
      hostId: config.hostId,
      defaultIoTimeout: config.ioTimeout,
      log,
      events,
      metrics: new LeaseMetrics(metrics.registry),
      stateDir: config.stateDir,
      eventsAfterReply: true,
    });
    await manager.start(config.monitorIntervalMs);
    // Announces this host to the scheduler (Kubernetes: nodes come and go).
    const agent = makeHostAgent(config, hostName, manager, tls, log.child({ component: 'host-agent' }));
    agent?.start();
    return {
      services: [service(pb.LeaseManagerServiceDefinition, leaseManagerHandlers(manager, config.hostId, roots))],
      localSocket: config.leaseSocket,
      leaseFrames: config.leaseFrames,
      stop: async () => {
        await agent?.stop();
        await manager.stop();
      },
    };
  },
});
