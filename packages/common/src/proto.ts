// All generated contracts of sdmesh.v1 in one module.
export * from './gen/sdmesh/v1/common';
export * from './gen/sdmesh/v1/events';
export * from './gen/sdmesh/v1/lease_manager';
export * from './gen/sdmesh/v1/metadata_tx';
export * from './gen/sdmesh/v1/data_mover';
export * from './gen/sdmesh/v1/gc';
export * from './gen/sdmesh/v1/scheduler';
