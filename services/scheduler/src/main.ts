#!/usr/bin/env node
import { pb, runService, service, unimplementedHandlers } from '@sdmesh/common';

void runService({
  name: 'scheduler',
  summary: 'scheduler: the public sdmesh API (domains, disks, hosts, operations), engine locks and placement.',
  options: {},
  async start() {
    const todo = 'see the scheduler issue';
    return {
      services: [
        service(pb.StorageDomainServiceDefinition, unimplementedHandlers(pb.StorageDomainServiceDefinition, todo)),
        service(pb.DiskServiceDefinition, unimplementedHandlers(pb.DiskServiceDefinition, todo)),
        service(pb.HostServiceDefinition, unimplementedHandlers(pb.HostServiceDefinition, todo)),
        service(pb.OperationServiceDefinition, unimplementedHandlers(pb.OperationServiceDefinition, todo)),
      ],
    };
  },
});
