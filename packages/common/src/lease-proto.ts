/**
 * The lease API's generated messages alone (common.proto and lease_manager.proto), for the lease
 * holder's modules: a process that only holds leases (a data-mover copy worker, started per job)
 * then does not load every service's contract (./proto).
 */
export * from './gen/sdmesh/v1/common';
export * from './gen/sdmesh/v1/lease_manager';
