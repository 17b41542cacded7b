import { fail, GrpcStatus, hasReason, isGenerationMismatch, pb, Reason, SdmeshError, unavailable } from '@sdmesh/common';
import type { DomainEntry } from '../domains';
import { CANCELLED_REASON, type FlowContext, type StepRun } from '../engine';
import type { HostState } from '../hosts';
import { CALL_TIMEOUT_MS, COPY_MAX_ATTEMPTS, isCopyHostFailure, isCopyJobLostItsLease } from '../policies';
import type { RunEnv } from './operation';
import { retryInStep, stepCall } from './placed-steps';

/**
 * One volume copy by a data-mover job, shared by copy, move and import:
 *   1. read the destination's generation, place the job, store its job id (before starting it,
 *      so a resumed run re-attaches instead of starting another);
 *   2. start the job and follow it to its end;
 *   3. if its host died or lost the lease: fence the destination (wait until no live host holds
 *      its volume lease, then bump its generation so a late writer fails) and go to 1 on
 *      another host, at most COPY_MAX_ATTEMPTS times.
 */

export interface VolumeLocation {
  domain: DomainEntry;
  imageId: string;
  volumeId: string;
}

/**
 * A volume job instead of a copy: an in-place change of `destination` (extend, sparsify, amend,
 * bitmaps; data-mover StartVolumeJob) with the same placement, following, fencing and retries.
 */
export interface VolumeJobSource {
  volumeJob: {
    operation: pb.StartVolumeJobRequest['operation'];
    /** The volume may be ILLEGAL from an earlier attempt of this operation (an extend: the job finishes it). */
    resumeIllegal: boolean;
  };
}

/** One data-mover job: from a volume, or (import) from a file on a named host, or a volume job. */
export interface CopySpec {
  source: VolumeLocation | { file: string } | VolumeJobSource;
  destination: VolumeLocation;
  /** Names the job's bookkeeping (scratch key, job ids) when one operation runs several jobs on one volume; default the volume id. */
  label?: string;
  collapse: boolean;
  /** A merge job (DeleteSnapshot): the source's data into the destination, its neighbour in the chain. */
  merge?: boolean;
  /** Run on this host only (an import's file is only there), in SDM and SPM mode alike. */
  pinnedHost?: string;
  /** The operation's progress at this many bytes of this copy; without it the engine sums its data steps (progressOfSteps). */
  overall?: (bytesDone: number) => pb.Progress;
  /**
   * Copies running beside this one (the volumes of one chain): each records its host here while
   * its job runs, and placement prefers a host none of the others is on.
   */
  siblings?: CopySiblings;
  /**
   * The destination was created ILLEGAL by this operation and only a job of this copy makes it
   * LEGAL: found LEGAL before an attempt, a job committed and its answer was lost (its host or
   * data-mover died after the commit), so the copy is done. A retry would be refused anyway once
   * the destination has children (a chain's parent, data-mover DESTINATION_HAS_CHILDREN).
   */
  createdIllegal?: boolean;
}

/** The hosts of a group of copies that run at once, by copy (label or destination volume id). */
export type CopySiblings = Map<string, string>;

/** Persisted per copy step (key `copy:<destination volume>`): survives a replica takeover. */
interface CopyScratch {
  attempt: number;
  host?: string;
  jobId?: string;
  generation?: number;
  excluded: string[];
  /** The host of the last attempt, once forgotten before a retry. */
  lastHost?: string;
}

const copyScratchKey = (destinationVolumeId: string) => `copy:${destinationVolumeId}`;
const volumeRef = (v: VolumeLocation): pb.VolumeRef => ({ domainPath: v.domain.path, imageId: v.imageId, volumeId: v.volumeId });
const isFinal = (job: pb.Job) =>
  job.status === pb.JobStatus.JOB_STATUS_DONE || job.status === pb.JobStatus.JOB_STATUS_FAILED || job.status === pb.JobStatus.JOB_STATUS_ABORTED;

/** Copies one volume (see the steps above); returns the host that did it and the destination's new generation. */
export async function copyVolume(env: RunEnv, ctx: FlowContext<unknown>, run: StepRun, spec: CopySpec): Promise<{ host: string; generation: number }> {
  const copy = new VolumeCopy(env, ctx, run, spec);
  try {
    return await copy.toCompletion();
  } finally {
    copy.releasePlacement();
    copy.leaveSiblings();
  }
}

class VolumeCopy {
  private scratch: CopyScratch;
  private readonly key: string;
  /** Ends the placement count of the current job's host. */
  releasePlacement: () => void = () => undefined;

  constructor(
    private readonly env: RunEnv,
    private readonly ctx: FlowContext<unknown>,
    private readonly run: StepRun,
    private readonly spec: CopySpec,
  ) {
    this.key = copyScratchKey(spec.label ?? spec.destination.volumeId);
    this.scratch = ctx.scratch<CopyScratch>(this.key) ?? { attempt: 0, excluded: [] };
    // Resumed while a job runs: it counts on its host.
    if (this.scratch.jobId && this.scratch.host) spec.siblings?.set(this.key, this.scratch.host);
  }

  /** This copy no longer runs a job: its siblings may use its host again. */
  leaveSiblings(): void {
    this.spec.siblings?.delete(this.key);
  }

  private get what(): string {
    const s = this.spec.source;
    if ('volumeJob' in s) return `${s.volumeJob.operation?.$case ?? 'volume'} job on volume ${this.spec.destination.volumeId}`;
    return 'file' in s ? `file ${s.file} on ${this.spec.pinnedHost}` : `volume ${s.volumeId}`;
  }

  /**
   * The attempts loop. Not `retry()`: the attempt count is persisted (a resumed copy goes on
   * counting) and every retry is preceded by a fence, not a timed backoff.
   */
  async toCompletion(): Promise<{ host: string; generation: number }> {
    for (;;) {
      if (!this.scratch.jobId) {
        const committed = await this.startAttempt();
        if (committed) return committed;
      }
      const { job, hostFailure, startRefused } = await this.runJob();
      if (job?.status === pb.JobStatus.JOB_STATUS_DONE) return { host: this.scratch.host!, generation: job.resultGeneration };
      // GENERATION_MISMATCH: the destination was fenced after this attempt read its generation (by
      // another replica resuming this operation, whose fence was not saved before it died): fence
      // and run again like a lost lease; failing left an ExtendDisk FAILED, its resize done (chaos seed 23).
      // A merge only goes forward once its target is ILLEGAL, and it is idempotent: a qemu-img that
      // died under it (killed, crashed) is run again rather than leaving the disk ILLEGAL behind a
      // FAILED operation (chaos seed 25); a merge that keeps failing ends TOO_MANY_ATTEMPTS.
      const rollForward = this.spec.merge && job?.error?.reason === Reason.QEMU_IMG_FAILED;
      if (job && !rollForward && !isCopyJobLostItsLease(job.error) && !isGenerationMismatch(job.error) && job.status !== pb.JobStatus.JOB_STATUS_ABORTED)
        throw this.jobFailed(job);
      await this.fenceBeforeRetry(job?.error?.reason || String(startRefused ?? hostFailure), hostFailure);
    }
  }

  /**
   * Reads the destination's generation, places the job and persists its id before it starts; or,
   * a destination created ILLEGAL found LEGAL (see createdIllegal), the copy an earlier job committed.
   */
  private async startAttempt(): Promise<{ host: string; generation: number } | undefined> {
    const destination = this.spec.destination;
    const vol = await this.env.cluster.read([destination.domain.id], (h) =>
      h.clients.metadata.getVolume(volumeRef(destination), stepCall(this.ctx, CALL_TIMEOUT_MS.getVolume)),
    );
    if (this.spec.createdIllegal && this.scratch.attempt > 0 && vol.volume!.legality === pb.Legality.LEGALITY_LEGAL) {
      this.ctx.log.info(
        { volume: destination.volumeId, generation: vol.volume!.generation },
        'destination already LEGAL: an earlier job of this copy committed',
      );
      return { host: this.scratch.lastHost ?? '', generation: vol.volume!.generation };
    }
    const placed = await this.place();
    // Counted on the host until the job ends, so concurrent copies spread before the
    // data-mover's own load report catches up.
    this.releasePlacement();
    this.releasePlacement = placed.done;
    const attempt = this.scratch.attempt + 1;
    this.scratch = {
      ...this.scratch,
      attempt,
      host: placed.host.spec.name,
      jobId: `${this.ctx.id}.${this.spec.label ?? destination.volumeId}.${attempt}`,
      generation: vol.volume!.generation,
    };
    this.spec.siblings?.set(this.key, placed.host.spec.name);
    await this.ctx.saveScratch(this.key, this.scratch);
    await this.run.setHost(placed.host.spec.name, attempt);
    return undefined;
  }

  /** A host for the job (the pinned one for an import), waiting while none fits (policy copyPlacement). */
  private place(): Promise<{ host: HostState; done: () => void }> {
    const hosts = this.env.cluster.hosts;
    const { source, destination, pinnedHost, siblings } = this.spec;
    const siblingHosts = () => new Set([...(siblings ?? [])].filter(([key]) => key !== this.key).map(([, host]) => host));
    const domainIds = 'domain' in source ? [source.domain.id, destination.domain.id] : [destination.domain.id];
    return retryInStep(
      this.ctx,
      this.env.policies.copyPlacement,
      async () => {
        try {
          return pinnedHost
            ? hosts.placeOn(pinnedHost, 'import_volume', [destination.domain.id])
            : hosts.place('volumeJob' in source ? 'volume_job' : 'copy_volume', domainIds, new Set(this.scratch.excluded), siblingHosts());
        } catch (err) {
          // Every healthy host failed this copy once: give them another chance.
          if (hosts.healthy().every((h) => this.scratch.excluded.includes(h.spec.name))) this.scratch.excluded = [];
          throw err;
        }
      },
      `place copy of ${this.what}`,
    );
  }

  /** Starts (or re-attaches to) the job and follows it: the final job, or the failure saying its host is gone. */
  private async runJob(): Promise<{ job?: pb.Job; hostFailure?: unknown; startRefused?: unknown }> {
    const { ctx, scratch } = this;
    const host = this.env.cluster.hosts.get(scratch.host!);
    try {
      if (!host) throw unavailable(`host ${scratch.host} is no longer known`, Reason.HOST_UNKNOWN);
      const { source, destination, collapse } = this.spec;
      if ('volumeJob' in source) {
        await host.clients.mover.startVolumeJob(
          {
            jobId: scratch.jobId!,
            volume: volumeRef(destination),
            generation: scratch.generation!,
            resumeIllegal: source.volumeJob.resumeIllegal,
            operation: source.volumeJob.operation,
          },
          stepCall(ctx, CALL_TIMEOUT_MS.startCopyJob),
        );
        return { job: await followJob(ctx, this.run, host, scratch.jobId!, this.spec.overall) };
      }
      await host.clients.mover.copyVolume(
        {
          jobId: scratch.jobId!,
          source: 'file' in source ? undefined : volumeRef(source),
          sourceFile: 'file' in source ? source.file : '',
          destination: volumeRef(destination),
          destinationGeneration: scratch.generation!,
          collapse,
          merge: !!this.spec.merge,
          rateLimitBytesPerSecond: this.env.settings.copyRateLimitBytesPerSecond,
        },
        stepCall(ctx, CALL_TIMEOUT_MS.startCopyJob),
      );
      return { job: await followJob(ctx, this.run, host, scratch.jobId!, this.spec.overall) };
    } catch (err) {
      if (ctx.signal.aborted) {
        // A cancel stops the job too; a shutdown leaves it running for the replica that resumes.
        if (hasReason(ctx.signal.reason, CANCELLED_REASON) && host)
          await host.clients.mover.abortJob({ jobId: scratch.jobId! }, { timeoutMs: CALL_TIMEOUT_MS.abortJob }).catch(() => undefined);
        throw ctx.signal.reason;
      }
      if (isCopyHostFailure(err)) return { hostFailure: err };
      // Refused at its start because the destination moved on from the generation this attempt
      // read: a resumed operation re-attaching to a job that a restarted data-mover forgot after it
      // had finished (an ExtendDisk FAILED with its resize done: chaos seed 31), or another
      // replica's fence. Fenced and run again, like a job refused later (the jobs are idempotent).
      if (isGenerationMismatch(err)) return { startRefused: err };
      throw err;
    }
  }

  private jobFailed(job: pb.Job): SdmeshError {
    const reason = job.error?.reason || Reason.COPY_FAILED;
    return new SdmeshError(
      job.error?.code || GrpcStatus.INTERNAL,
      `copy of ${this.what} failed on ${this.scratch.host}: ${job.error?.message ?? 'unknown error'}`,
      reason,
    );
  }

  /** The host died, lost its lease, or the destination is still held (by a dead host's job): fence, forget the job, count the attempt. */
  private async fenceBeforeRetry(why: string, hostFailure: unknown): Promise<void> {
    const failedHost = this.scratch.host!;
    this.ctx.log.warn({ host: failedHost, job: this.scratch.jobId, reason: why }, 'copy step lost its host or lease; fencing the destination before a retry');
    if (hostFailure) {
      this.env.cluster.hosts.markFailed(failedHost, String(hostFailure));
      if (!this.scratch.excluded.includes(failedHost)) this.scratch.excluded = [...this.scratch.excluded, failedHost];
    }
    await fenceDestination(this.env, this.ctx, this.spec.destination);
    this.scratch = { ...this.scratch, lastHost: failedHost, jobId: undefined, host: undefined, generation: undefined };
    this.leaveSiblings();
    await this.ctx.saveScratch(this.key, this.scratch);
    if (this.scratch.attempt >= COPY_MAX_ATTEMPTS) throw fail(Reason.TOO_MANY_ATTEMPTS, `copy of ${this.what} failed ${this.scratch.attempt} times`);
  }
}

/**
 * Follows a data-mover job's stream to its final state. Any step that runs a data job (copy,
 * import, or another kind) reports its progress through this: each change of the job's
 * progress goes to the step (`run.progress`, throttled there to one write and one event a
 * second) and so to the operation's progress and its WatchOperation streams.
 */
export async function followJob(
  ctx: FlowContext<unknown>,
  run: StepRun,
  host: HostState,
  jobId: string,
  overall?: (bytes: number) => pb.Progress,
): Promise<pb.Job> {
  // No deadline on the stream: it lasts as long as the copy. A dead host breaks it (host
  // failure → fence → retry); cancel and shutdown end it through the signal.
  for await (const job of host.clients.mover.watchJob({ jobId }, { signal: ctx.signal })) {
    if (job.progress) {
      const whole = overall?.(job.progress.bytesDone);
      await run.progress(job.progress, whole && { ...whole, mbps: whole.mbps || job.progress.mbps });
    }
    if (isFinal(job)) return job;
  }
  // The stream ended without a final state: ask once.
  const last = await host.clients.mover.getJob({ jobId }, stepCall(ctx, CALL_TIMEOUT_MS.getJob));
  if (isFinal(last)) return last;
  throw unavailable(`job ${jobId} on ${host.spec.name} stopped reporting`, Reason.JOB_STREAM_ENDED);
}

/**
 * Waits (policy `fence`) until no live host holds the destination's volume lease, then bumps
 * its generation. Until then each attempt fails FENCE_TIMEOUT, the error left when time runs out.
 */
export async function fenceDestination(env: RunEnv, ctx: FlowContext<unknown>, d: VolumeLocation): Promise<void> {
  const ref = volumeRef(d);
  await retryInStep(
    ctx,
    env.policies.fence,
    async () => {
      const vol = (await env.cluster.read([d.domain.id], (h) => h.clients.metadata.getVolume(ref, stepCall(ctx, CALL_TIMEOUT_MS.getVolume)))).volume!;
      const freeOfLiveHosts = await leaseFreeOfLiveHosts(env, ctx, d.domain.id, vol.lease);
      // GENERATION_MISMATCH: a late job moved it meanwhile (read again); VOLUME_IN_USE: metadata-tx could
      // not take the volume lease (a dead host's job holds it until host_dead): both retried by the policy.
      // The bump is tried even when the on-disk owner's host is live: sanlock's acquire is what decides.
      // The owner may be a former incarnation of that host (its sanlock daemon restarted, the lease's
      // owner generation older than the host's), whose lease sanlock grants at once; a holder that is
      // really alive refuses the acquire (VOLUME_IN_USE). Found by the chaos run (docs/chaos.md).
      await env.cluster
        .read([d.domain.id], (h) =>
          h.clients.metadata.updateVolume(
            { ...ref, generation: vol.generation, bumpGeneration: true, operationId: ctx.id },
            stepCall(ctx, CALL_TIMEOUT_MS.bumpGeneration),
          ),
        )
        .catch((err: unknown) => {
          if (!freeOfLiveHosts && hasReason(err, Reason.VOLUME_IN_USE, Reason.LEASE_HELD)) {
            throw fail(Reason.FENCE_TIMEOUT, `the destination volume ${d.volumeId} is still held by a live host after ${env.settings.fenceTimeoutMs} ms`);
          }
          throw err;
        });
      ctx.log.info({ volume: d.volumeId, generation: vol.generation + 1 }, 'destination fenced (generation bumped)');
    },
    `fence volume ${d.volumeId}`,
  );
}

/** Whether every owner of the lease is a host sanlock calls DEAD or FREE (a dead host's lease is free only after host_dead). */
async function leaseFreeOfLiveHosts(env: RunEnv, ctx: FlowContext<unknown>, domainId: string, lease: pb.Volume['lease']): Promise<boolean> {
  return env.cluster
    .read([domainId], async (h) => {
      const owner = await h.clients.leases.getLeaseOwner({ lease }, stepCall(ctx, CALL_TIMEOUT_MS.getLeaseOwner));
      if (owner.ownerHostIds.length === 0) return true;
      const { hosts } = await h.clients.leases.listLockspaceHosts({ lockspace: domainId }, stepCall(ctx, CALL_TIMEOUT_MS.listLockspaceHosts));
      const live = new Map(hosts.map((s) => [s.hostId, s.liveness]));
      return owner.ownerHostIds.every((id) => {
        const l = live.get(id);
        return l === pb.HostLiveness.HOST_LIVENESS_DEAD || l === pb.HostLiveness.HOST_LIVENESS_FREE;
      });
    })
    .catch((err: unknown) => {
      ctx.log.warn({ err: String(err) }, 'could not read the destination lease owner');
      return false;
    });
}

/** Stops every copy job this operation may still have running, so none holds the target's leases. */
export async function abortCopyJobs(env: RunEnv, ctx: FlowContext<unknown>): Promise<void> {
  const scratch = (ctx.rec.state.scratch ?? {}) as Record<string, CopyScratch>;
  for (const [key, sc] of Object.entries(scratch)) {
    if (!key.startsWith('copy:') || !sc.jobId || !sc.host) continue;
    const h = env.cluster.hosts.get(sc.host);
    if (!h?.healthy) continue;
    await h.clients.mover.abortJob({ jobId: sc.jobId }, stepCall(ctx, CALL_TIMEOUT_MS.abortJob)).catch(() => undefined);
  }
}
