import { GrpcStatus, hasReason, isGenerationMismatch, isLeaseHeldOnThisHost, Reason, SdmeshError, type RetryPolicy } from '@sdmesh/common';

/**
 * Timeouts and retry policies of the scheduler's operations, as named data (in the spirit of
 * temporal's activity options): every call a step or a request handler makes to a host takes
 * its deadline from CALL_TIMEOUT_MS, and every retry loop is `retry(policy, …)` with one of
 * the policies below.
 */

/** How long one call to a host's service may take (ms). */
export const CALL_TIMEOUT_MS = {
  formatDomain: 120_000,
  /** Joining only starts (wait: false); joining itself takes ~2·io_timeout. */
  startJoiningLockspace: 10_000,
  leaveLockspace: 30_000,
  getDomain: 10_000,
  /** Emptiness checks of a domain (RemoveStorageDomain). */
  listImages: 15_000,
  /** ListDisks reads every image of a domain. */
  listDisks: 30_000,
  listVolumes: 15_000,
  getVolume: 15_000,
  /** Creating a (possibly preallocated) volume. */
  createVolume: 300_000,
  createSnapshot: 120_000,
  deleteImage: 120_000,
  inspectFile: 60_000,
  startCopyJob: 30_000,
  abortJob: 30_000,
  getJob: 10_000,
  getLeaseOwner: 10_000,
  listLockspaceHosts: 10_000,
  bumpGeneration: 60_000,
  /** A merge's record changes (a header rewrite and a few renames). */
  finalizeMerge: 120_000,
  /** Image transfer: opening the export (leases, qemu), a counters read, closing it (flush, qemu-img check of the leaf). */
  openTransfer: 120_000,
  getTransfer: 10_000,
  closeTransfer: 300_000,
} as const;

/** A copy step gives up after this many jobs (each on a fenced destination). */
export const COPY_MAX_ATTEMPTS = 10;

/** Settings of the flows that come from the command line. */
export interface FlowSettings {
  /** How long a step waits for a host to place it on (none healthy, no SPM yet). */
  placementWaitMs: number;
  /** How long a copy waits for a dead host's lease on the destination to expire before failing. */
  fenceTimeoutMs: number;
  /** Lockspace io_timeout for new domains. */
  domainIoTimeoutSeconds: number;
  /** Throttle copies (tests and benchmarks); 0 = unlimited. */
  copyRateLimitBytesPerSecond: number;
  /** How long a leave step keeps asking hosts that do not answer before LEAVE_INCOMPLETE (default LEAVE_STEP_MS). */
  lockspaceLeaveMs?: number;
}

/** Errors that say "this host did not answer", not "the request was wrong". */
export const isHostUnreachable = (err: unknown) => {
  const e = SdmeshError.from(err);
  return (
    e.code === GrpcStatus.UNAVAILABLE ||
    e.code === GrpcStatus.DEADLINE_EXCEEDED ||
    (e.code === GrpcStatus.CANCELLED && !hasReason(e, Reason.OPERATION_CANCELLED))
  );
};

/** No host can take the step right now (none healthy, none reaching the domain, no SPM). */
export const isNoHostYet = (err: unknown) => SdmeshError.from(err).code === GrpcStatus.UNAVAILABLE;

/**
 * A data job still holds the volume's lease (metadata-tx could not take it): on a dead host
 * that lasts until sanlock calls the host dead.
 */
export const isVolumeLeaseBusy = (err: unknown) => hasReason(err, Reason.VOLUME_IN_USE, Reason.LEASE_HELD);

/**
 * The answering host's lockspace is in trouble (storage loss: sanlock refuses acquires there, a
 * join meanwhile answers "try again"); it rejoins within seconds, or another host answers next.
 * A fence or rollback given up on it left a disk ILLEGAL or a target visible behind a FAILED
 * operation (chaos seeds 21, 23, 48).
 */
export const isLockspaceTrouble = (err: unknown) => hasReason(err, Reason.ACQUIRE_FAILED, Reason.LOCKSPACE_NOT_JOINED, Reason.JOIN_FAILED);

/** A copy job whose host lost it (lease lost, worker died, destination still leased): fence and retry elsewhere. */
export const isCopyJobLostItsLease = (err: unknown) => hasReason(err, Reason.LEASE_HELD, Reason.LEASE_HELD_ON_THIS_HOST, Reason.LEASE_LOST, Reason.WORKER_DIED);

/** A copy call that says the job's host is gone (unreachable, or a restarted data-mover that forgot the job) or the destination is busy. */
export const isCopyHostFailure = (err: unknown) => isHostUnreachable(err) || hasReason(err, Reason.JOB_NOT_FOUND, Reason.DESTINATION_BUSY);

/** The retry policies of the flows; their total times come from the settings. */
export function retryPolicies(settings: FlowSettings) {
  return {
    /**
     * A step sent to a placed host: wait for a host, move to another host when one does not
     * answer (steps are idempotent), retry shortly when metadata-tx on that host is in another
     * transaction of the same domain (sanlock: one holder per resource per host).
     */
    placedStep: {
      totalMs: settings.placementWaitMs,
      initialBackoffMs: 200,
      maxBackoffMs: 1000,
      retryable: (err: unknown) => isNoHostYet(err) || isLeaseHeldOnThisHost(err) || isHostUnreachable(err),
    },
    /** A copy job waits for a host (or its pinned host) to become placeable. */
    copyPlacement: { totalMs: settings.placementWaitMs, initialBackoffMs: 1000, maxBackoffMs: 1000, retryable: isNoHostYet },
    /**
     * Rollback of a copy (and a move's delete-source): the target can be deleted once no job (on a dead host) holds its leases,
     * and once the host's lockspace works again: a host that lost its lockspace (storage trouble;
     * sanlock refuses acquires in it, a join meanwhile answers "try again") rejoins it within
     * seconds. Given up at once, the target stayed visible with its operation FAILED (chaos seeds 21, 23).
     */
    deleteLeasedTarget: {
      totalMs: settings.fenceTimeoutMs,
      initialBackoffMs: 2000,
      maxBackoffMs: 2000,
      retryable: (err: unknown) => isVolumeLeaseBusy(err) || isLockspaceTrouble(err),
    },
    /**
     * Fencing a destination: until no live host holds its lease and the generation bump succeeds
     * (also while the answering host's lockspace is in trouble).
     * Tried every 500 ms (reads of sanlock's state on a host and a bump attempt, which metadata-tx
     * refuses in a few ms while a live holder has the lease): the copy's failover is host_dead plus
     * this poll, the bump and a new job (bench/failover.ts).
     */
    fence: {
      totalMs: settings.fenceTimeoutMs,
      initialBackoffMs: 500,
      maxBackoffMs: 500,
      retryable: (err: unknown) => isVolumeLeaseBusy(err) || hasReason(err, Reason.FENCE_TIMEOUT) || isGenerationMismatch(err) || isLockspaceTrouble(err),
    },
  } satisfies Record<string, RetryPolicy>;
}

export type RetryPolicies = ReturnType<typeof retryPolicies>;
