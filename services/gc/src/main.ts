#!/usr/bin/env node
import { pb, runService, service, unimplementedHandlers } from '@sdmesh/common';

void runService({
  name: 'gc',
  summary: 'gc: removes what interrupted transactions and deletes left behind; one active host per domain.',
  options: {},
  async start() {
    return { services: [service(pb.GcServiceDefinition, unimplementedHandlers(pb.GcServiceDefinition, 'see the gc issue'))] };
  },
});
