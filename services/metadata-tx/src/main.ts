#!/usr/bin/env node
import { pb, runService, service, unimplementedHandlers } from '@sdmesh/common';

void runService({
  name: 'metadata-tx',
  summary: 'metadata-tx: short metadata operations as storage transactions under the domain metadata lease.',
  options: {},
  async start() {
    return { services: [service(pb.MetadataTxServiceDefinition, unimplementedHandlers(pb.MetadataTxServiceDefinition, 'see the metadata-tx issue'))] };
  },
});
