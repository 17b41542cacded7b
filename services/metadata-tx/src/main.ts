#!/usr/bin/env node
import { pb, runService, service } from '@sdmesh/common';
import { FaultInjector } from './faults';
import { metadataTxHandlers } from './handlers';
import { InProcessDomainLeaseProvider } from './leases';
import { MetadataTransactions } from './transactions';

void runService({
  name: 'metadata-tx',
  summary: 'metadata-tx: short metadata operations as storage transactions under the domain metadata lease.',
  options: {
    hostId: { type: 'int', description: "This host's sanlock host id (1..2000; 0 = unknown), recorded in transaction ids.", default: 0, min: 0, max: 2000 },
    leaseManagerAddress: { type: 'string', description: "Address of this host's lease-manager (empty = single-process mode, for tests only).", default: '' },
    faultPoint: { type: 'string', description: 'Testing only: SIGKILL this process at the named fault point.', default: '' },
  },
  async start(ctx) {
    const { hostId, leaseManagerAddress, faultPoint } = ctx.config;
    if (leaseManagerAddress) {
      // The lease-manager backed provider is built with the lease-manager service.
      throw new Error('leaseManagerAddress is set but the lease-manager lease provider is not available in this build');
    }
    ctx.log.warn(
      'SINGLE-PROCESS MODE: no lease-manager address, so the domain metadata lease is an in-process mutex. ' +
        'This is unsafe if any other host or process writes the same storage domains.',
    );
    if (faultPoint) ctx.log.warn({ faultPoint }, 'fault injection armed: this process will SIGKILL itself at that point');
    const tx = new MetadataTransactions({
      leases: new InProcessDomainLeaseProvider(),
      registry: ctx.metrics.registry,
      events: ctx.events,
      log: ctx.log,
      hostId,
      faults: new FaultInjector(faultPoint),
    });
    return { services: [service(pb.MetadataTxServiceDefinition, metadataTxHandlers(tx))] };
  },
});
