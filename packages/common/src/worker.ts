/**
 * `@sdmesh/common/worker`: the part of @sdmesh/common a worker process needs that holds volume
 * leases and reads and writes a domain, without the server side (gRPC server, reflection, health,
 * authorization), NATS, metrics and every service's generated contract. A data-mover copy worker
 * starts for every job, beside a running job on the same cores (issue 17: the copy's fixed cost):
 * loading the whole package took ≈ 2x the CPU. Same modules as '@sdmesh/common' (one instance of
 * each), so errors and classes are the same.
 */

// Logging, audit lines, errors and their reasons
export { createLogger } from './logger';
export type { Logger } from './logger';
export { audit, brokenForTest } from './audit';
export { aborted, alreadyExists, failedPrecondition, GrpcStatus, internal, invalidArgument, notFound, SdmeshError } from './errors';
export { fail, isLeaseHeldByAnother, Reason } from './reasons';

// Leases: this process as a sanlock holder, volume leases, the global lease order
export { LeaseHolder } from './lease-holder';
export { DomainLeases } from './domain-leases';
export { holdLeasesInOrder } from './lease-order';
export type { LeaseClaim } from './lease-order';

// Storage: the on-disk format, confined file access, qemu-img without probing
export { DomainLayout, FIRST_VOLUME_SLOT, LEASE_SLOT_SIZE, leaseOffset, newTxId, TX_INFIX, volumeDataName, volumeMetaName } from './storage/layout';
export { MAX_CAPACITY_BYTES, validateCapacity } from './storage/validation';
export { encodeDomainMetadata, encodeVolumeRecord, newVolumeRecord } from './storage/records';
export type { VolumeRecord } from './storage/records';
export { readVolumeRecord } from './storage/domain';
export { ConfinedRoot, setStorageGroup } from './storage/confined';
export { checkQcow2Header, FIRST_CHILD_FD, hasQcow2Magic, imageSpec, runQemuImgWithFds } from './storage/qemu-img';
export { isValidBitmap, parseQcow2Compat, QemuBitmaps, validateBitmapName, validateGranularity } from './storage/bitmaps';
export { checkRef, openVolumeChain, resolveVolume } from './storage/volume-chain';
export type { OpenedChain, ResolvedVolume } from './storage/volume-chain';
