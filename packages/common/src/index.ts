/**
 * The public surface of @sdmesh/common: what services, tools and the local mesh may use.
 * Everything else is internal; tests reach it through '@sdmesh/common/internal'.
 */

// Configuration, logging, metrics, process helpers
export { commonOptions, ConfigError } from './config';
export { createLogger } from './logger';
export type { Logger } from './logger';
export { ServiceMetrics } from './metrics';
export { processRunning } from './process';
export { FaultInjector } from './faults';
export { audit, auditEnabled, brokenForTest, monotonicMicros } from './audit';
export type { AuditLine, AuditRecord } from './audit';

// Errors: one error type, the declared reasons, retries
export {
  aborted,
  alreadyExists,
  cancelled,
  failedPrecondition,
  GrpcStatus,
  internal,
  invalidArgument,
  notFound,
  permissionDenied,
  resourceExhausted,
  SdmeshError,
  unavailable,
} from './errors';
export { fail, hasReason, Reason, isGenerationMismatch, isLeaseHeld, isLeaseHeldByAnother, isLeaseHeldOnThisHost, REASONS } from './reasons';
export type { ReasonWithCode } from './reasons';
export { retry, sleepUnlessAborted } from './retry';
export type { RetryPolicy } from './retry';

// gRPC: services, clients, deadlines, mTLS, identities, authorization
export { callOptions, checkHealth, createClient, GrpcServer, service, TLS_CHANNEL_OPTIONS } from './grpc';
export type { CallContext, CallOptions, RegisteredService, ServiceClient, ServiceDefinition, ServiceHandlers } from './grpc';
export { loadConfigOrExit, runService } from './service';
export { identityOfCertificate, MeshTls, sameIdentity, serverIdentityCheck } from './tls';
export type { TlsFiles } from './tls';
export { describeIdentity, identityUri } from './identity';
export type { HostServiceName, Identity } from './identity';
export { Authorizer, RolesFile } from './authz';

// NATS: events and KV
export {
  ensureEventStream,
  EVENT_STREAM,
  EVENT_SUBJECT_PREFIX,
  eventFilter,
  EventPublisher,
  eventSubject,
  natsConnectionOptions,
  natsServers,
  MAX_NATS_REPLICAS,
  openKv,
  subscribeEvents,
  isJetStreamNotReady,
} from './nats';
export type { KV, NodeConnectionOptions } from './nats';

// Leases: this process as a sanlock holder, domain leases, global lease order, host announcements
export { LeaseHolder, localLeaseManagerClient } from './lease-holder';
export { LEASE_MANAGER_RESTART, untilLeaseManagerAnswers } from './lease-manager-restart';
export type { LeaseMode, WantedLease } from './lease-holder';
export { DomainLeases } from './domain-leases';
export type { DomainRef } from './domain-leases';
export { holdLeasesInOrder } from './lease-order';
export type { LeaseClaim } from './lease-order';
export { HostAgent } from './host-agent';

// Wire enums ⇄ names
export { LEASE_MODE, LEGALITY, VOLUME_ALLOCATION, VOLUME_FORMAT } from './enums';

// Storage: the on-disk format, confined file access, qemu-img without probing, storage roots
export {
  classifyImageEntry,
  classifyVolumeEntry,
  DEFAULT_IO_TIMEOUT_SECONDS,
  DEFAULT_MAX_VOLUMES,
  deletedVolumeDataName,
  deletedVolumeMetaName,
  DOMAIN_LEASE,
  DomainLayout,
  FIRST_VOLUME_SLOT,
  FORMAT_VERSION,
  IDS_FILE_SIZE,
  LEASE_SLOT_SIZE,
  leaseOffset,
  MAX_HOST_ID,
  MAX_MAX_VOLUMES,
  newTxId,
  RESERVED_LEASES,
  SPM_LEASE,
  TX_INFIX,
  volumeDataName,
  volumeMetaName,
  volumeMetaTxName,
} from './storage/layout';
export {
  isUuid,
  MAX_CAPACITY_BYTES,
  roundUpToSector,
  safeJoin,
  validateCapacity,
  validateDescription,
  validateDomainName,
  validateDomainPath,
  validateId,
} from './storage/validation';
export { corruptRecord, decodeRecord, encodeDomainMetadata, encodeRecord, encodeVolumeRecord, newVolumeRecord, parentImageOf } from './storage/records';
export type { DomainMetadata, VolumeAllocationName, VolumeFormatName, VolumeRecord } from './storage/records';
export { ioError } from './storage/fsio';
export {
  findGarbage,
  listCommittedImageIds,
  listVolumeRecords,
  lowestFreeSlot,
  orderChain,
  readDomainMetadata,
  readVolumeRecord,
  scanLeaseSlots,
} from './storage/domain';
export type { GarbageClock, GarbageItem, GarbageKind, SkippedEntries, VolumeListing } from './storage/domain';
export { DEFAULT_FENCE_RETENTION_MS, fenceFileName, isFenceExpired, parseFenceName } from './storage/fences';
export type { FenceName } from './storage/fences';
export {
  ConfinedRoot,
  descriptor,
  directIoRefused,
  DIRECTORY_MODE,
  RECORD_FILE_MODE,
  reopenDirect,
  resolveGroup,
  setStorageGroup,
  unexpectedType,
  VOLUME_FILE_MODE,
} from './storage/confined';
export { checkQcow2Header, FIRST_CHILD_FD, hasQcow2Magic, imageSpec, runQemuImgWithFds } from './storage/qemu-img';
export type { ImageFormatName } from './storage/qemu-img';
export { BITMAP_NAME_MAX, isValidBitmap, parseBitmaps, parseQcow2Compat, QemuBitmaps, validateBitmapName, validateGranularity } from './storage/bitmaps';
export type { BitmapRunOptions, DirtyBitmap } from './storage/bitmaps';
export { parseStorageRoots, StorageRoots, storageRootsOption } from './storage/roots';
// sanlock's leader record read straight from storage (a look, not a decision)
export { LEADER_READ_BYTES, parseLeaderRecord, readLeaderSector } from './storage/sanlock-leader';
export type { LeaderRecord } from './storage/sanlock-leader';
// A qemu-storage-daemon export (FUSE or NBD) holding volume leases as its own pid (issue 18; reused by image transfer)
export { isMountPoint, LeasedExport, processStartTime, storageDaemonPath } from './storage/leased-export';
export type { ExportedLayer, ExportHandle, ExportLease, ExportTarget, LeasedExportOptions } from './storage/leased-export';
export { QmpClient, QmpError } from './storage/qmp';
export { checkRef, openVolumeChain, resolveVolume } from './storage/volume-chain';
export type { OpenedChain, ResolvedVolume } from './storage/volume-chain';
// Image transfer (issue 19): an NBD client for exports of qemu-nbd
export {
  BASE_ALLOCATION,
  dirtyBitmapContext,
  NBD_FLAG,
  NBD_MAX_REQUEST,
  NBD_STATE_DIRTY,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NbdClient,
  NbdError,
} from './storage/nbd-client';
export type { NbdConnectOptions, NbdExtent } from './storage/nbd-client';
export * as pb from './proto';
// The CSI spec's contract (csi.v1), served by services/csi.
export * as csi from './gen/csi/v1/csi';
