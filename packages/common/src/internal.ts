/**
 * Everything @sdmesh/common has, for tests that reach below the public surface (index.ts).
 * Service code imports '@sdmesh/common' only.
 */
export * from './config';
export * from './errors';
export * from './reasons';
export * from './grpc';
export * from './logger';
export * from './metrics';
export * from './nats';
export * from './service';
export * as pb from './proto';
export * from './lease-holder';
export * from './lease-manager-restart';
export * from './domain-leases';
export * from './storage';
export * from './process';
export * from './faults';
export * from './host-agent';
export * from './identity';
export * from './tls';
export * from './authz';
export * from './request-decode';
export * from './retry';
export * from './lease-order';
export * from './enums';
export * from './lease-frames';
export * from './lease-frames-client';
export * from './local-socket';
