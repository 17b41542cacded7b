#!/usr/bin/env node
import { pb, runService, service, unimplementedHandlers } from '@sdmesh/common';

void runService({
  name: 'lease-manager',
  summary: 'lease-manager: wraps the sanlock daemon; the only way sdmesh services take cluster-wide leases.',
  options: {},
  async start() {
    return { services: [service(pb.LeaseManagerServiceDefinition, unimplementedHandlers(pb.LeaseManagerServiceDefinition, 'see the lease-manager issue'))] };
  },
});
