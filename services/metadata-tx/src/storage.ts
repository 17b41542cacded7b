// The shared storage format. Re-exported here so that switching to `@sdmesh/common` (once its
// index exports `./storage`) is a one-line change.
export * from '../../../packages/common/src/storage';
