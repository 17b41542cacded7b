/** IPC messages between the data-mover service (parent) and one copy worker process. */
import { SdmeshError } from '@sdmesh/common/worker';

export interface CopyJobSpec {
  jobId: string;
  /** The source volume; absent for an import, which reads `sourceFile` instead. */
  source?: { domainPath: string; imageId: string; volumeId: string };
  /** Import: absolute path of a plain raw/qcow2 file on this host (no lease on it). */
  sourceFile?: string;
  /** Import: the file the service inspected; the worker refuses another one (SOURCE_CHANGED). */
  sourceIdentity?: { dev: number; ino: number; size: number; mtimeMs: number };
  destination: { domainPath: string; imageId: string; volumeId: string };
  destinationGeneration: number;
  collapse: boolean;
  verify: boolean;
  rateLimitBytesPerSecond: number;
  /** A merge (merge.ts): the source's data into the destination, its parent or (a base's) child. */
  merge?: boolean;
  /** A volume job (volume-job.ts): this in-place change of `destination` instead of a copy into it. */
  volumeOp?: VolumeOp;
  /** A volume job may find the volume ILLEGAL from an interrupted earlier attempt of the same change. */
  resumeIllegal?: boolean;
  /**
   * A copy or merge: where the service found the two volumes' leases when it checked the job. The
   * worker takes the leases there at once and reads the records only under them, where it checks
   * that they still name these leases (else it starts over from what the records say).
   */
  leaseSlots?: { source: LeaseSlot; destination: LeaseSlot };
}

/** A volume's lease as a record named it: its domain (the lockspace) and its slot in the domain's leases file. */
export interface LeaseSlot {
  domainId: string;
  slot: number;
}

/** The in-place changes a volume job makes (StartVolumeJobRequest.operation). */
export type VolumeOp =
  | { kind: 'extend'; capacityBytes: number }
  | { kind: 'sparsify' }
  | { kind: 'amend'; compat: string }
  | { kind: 'add-bitmap'; name: string; granularityBytes: number }
  | { kind: 'remove-bitmap'; name: string }
  | { kind: 'clear-bitmaps' };

export interface WorkerConfig {
  leaseManagerAddress: string;
  hostId: number;
  hostName: string;
  logLevel: string;
  /** How long the worker waits for the source's shared lease (readers on this host queue). */
  sourceLeaseWaitMs: number;
  /** Directories imports may read from (resolved, canonical); empty = imports disabled. */
  importDirs: string[];
  /** Group of the record files the worker writes (undefined: the process's). */
  storageGroupId?: number;
}

export type JobPhase =
  'waiting' | 'acquiring-leases' | 'copying' | 'merging' | 'verifying' | 'committing' | 'resizing' | 'scanning' | 'sparsifying' | 'amending' | 'bitmaps';

export interface WireError {
  code: number;
  message: string;
  reason: string;
}

/**
 * `prepare` comes first, right after the worker is started (possibly long before a job): the
 * worker registers with sanlock and connects to the lease-manager, holding no lease. `start`
 * gives it its one job.
 */
export type ParentToWorker =
  { type: 'prepare'; config: WorkerConfig } | { type: 'start'; job: CopyJobSpec; config: WorkerConfig } | { type: 'abort'; reason: string };

export type WorkerToParent =
  /** A warm worker has started: modules loaded, registered, connected, rehearsed (or it got its job first). */
  | { type: 'ready' }
  | { type: 'registered'; pid: number }
  | { type: 'phase'; phase: JobPhase }
  | { type: 'marked-illegal' }
  /** dataBytes: allocated bytes qemu-img will copy (from qemu-img map); totalBytes: guest size. */
  | { type: 'progress'; percent: number; dataBytes: number; totalBytes: number }
  | { type: 'done'; generation: number; verified: boolean; bytesFreed?: number }
  | { type: 'failed'; error: WireError };

/** An error as it crosses the IPC channel (code, message, reason). */
export function toWire(err: unknown): WireError {
  const e = SdmeshError.from(err);
  return { code: e.code, message: e.message, reason: e.reason };
}

/** Sends a message to the parent over IPC; resolves once it is written (or at once without a channel). */
export function sendToParent(msg: object): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send || !process.connected) return resolve();
    process.send(msg, undefined, {}, () => resolve());
  });
}
