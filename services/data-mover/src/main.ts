#!/usr/bin/env node
import { pb, runService, service, unimplementedHandlers } from '@sdmesh/common';

void runService({
  name: 'data-mover',
  summary: 'data-mover: long data operations (copies) under volume leases only.',
  options: {},
  async start() {
    return { services: [service(pb.DataMoverServiceDefinition, unimplementedHandlers(pb.DataMoverServiceDefinition, 'see the data-mover issue'))] };
  },
});
