import { failedPrecondition, GrpcStatus, notFound, pb, SdmeshError, unavailable } from '@sdmesh/common';
import { CANCELLED_REASON, type Flow, type FlowContext, type OperationResult, type StepRun } from './engine';
import { Cluster, isHostUnreachable, sleep, toDisk } from './cluster';
import type { DomainEntry } from './domains';
import type { HostState } from './hosts';

export interface FlowSettings {
  /** How long a step waits for a host to place it on (none healthy, no SPM yet). */
  placementWaitMs: number;
  /** How long a copy waits for a dead host's lease on the destination to expire before failing. */
  fenceTimeoutMs: number;
  /** Lockspace io_timeout for new domains. */
  domainIoTimeoutSeconds: number;
  /** Throttle copies (tests and benchmarks); 0 = unlimited. */
  copyRateLimitBytesPerSecond: number;
}

type Ctx = FlowContext;

const isCancel = (err: unknown) => err instanceof SdmeshError && err.reason === CANCELLED_REASON;

/**
 * Runs `fn` on a host chosen for this step; a host that does not answer is marked down and
 * the step moves to another one (steps sent this way are idempotent); waits while no host fits.
 */
async function onHost<T>(ctx: Ctx, cluster: Cluster, settings: FlowSettings, run: StepRun, kind: string, domainIds: string[], fn: (h: HostState) => Promise<T>): Promise<T> {
  const excluded = new Set<string>();
  const until = Date.now() + settings.placementWaitMs;
  for (;;) {
    let placed: ReturnType<Cluster['hosts']['place']>;
    try {
      placed = cluster.hosts.place(kind, domainIds, excluded);
    } catch (err) {
      const e = SdmeshError.from(err);
      if (e.code !== GrpcStatus.UNAVAILABLE || Date.now() > until) throw err;
      if (excluded.size > 0 && cluster.hosts.healthy().every((h) => excluded.has(h.spec.name))) excluded.clear();
      await sleep(1000, ctx.signal);
      continue;
    }
    try {
      await run.setHost(placed.host.spec.name);
      return await fn(placed.host);
    } catch (err) {
      if (isLocalLeaseContention(err) && !ctx.signal.aborted && Date.now() < until) {
        // metadata-tx on that host is in another transaction of the same domain (one sanlock
        // holder per resource per host): the step is idempotent, try again shortly.
        await sleep(200 + Math.random() * 300, ctx.signal);
        continue;
      }
      if (!isHostUnreachable(err) || ctx.signal.aborted) throw err;
      ctx.log.warn({ host: placed.host.spec.name, kind, err: String(err) }, 'host did not answer; trying another');
      cluster.hosts.markFailed(placed.host.spec.name, String(err));
      excluded.add(placed.host.spec.name);
      if (Date.now() > until) throw err;
    } finally {
      placed.done();
    }
  }
}

/** A lease busy on the same host (a concurrent transaction of the same process): worth a retry. */
const isLocalLeaseContention = (err: unknown) => {
  const e = SdmeshError.from(err);
  return e.code === GrpcStatus.ABORTED && ['LEASE_ALREADY_HELD', 'LEASE_HELD_ON_THIS_HOST', 'LEASE_BUSY', 'EBUSY'].includes(e.reason);
};

const ignoreNotFound = (err: unknown) => {
  if (SdmeshError.from(err).code !== GrpcStatus.NOT_FOUND) throw err;
};

/** Plain (JSON-safe) description of a source volume, kept in the operation's state. */
interface VolumePlan {
  id: string;
  parentId: string;
  format: pb.VolumeFormat;
  allocation: pb.VolumeAllocation;
  capacityBytes: number;
  description: string;
}

/** One data-mover job: from a volume, or (import) from a file on a named host. */
interface CopySpec {
  source: { domain: DomainEntry; imageId: string; volumeId: string } | { file: string };
  destination: { domain: DomainEntry; imageId: string; volumeId: string };
  collapse: boolean;
  /** Run on this host only (an import's file is only there), in SDM and SPM mode alike. */
  pinnedHost?: string;
  overall: (bytesDone: number) => pb.Progress;
}

interface CopyScratch {
  attempt: number;
  host?: string;
  jobId?: string;
  generation?: number;
  excluded: string[];
}

export class Flows {
  constructor(
    private readonly cluster: Cluster,
    private readonly settings: FlowSettings,
  ) {}

  private onHost<T>(ctx: Ctx, run: StepRun, kind: string, domainIds: string[], fn: (h: HostState) => Promise<T>): Promise<T> {
    return onHost(ctx, this.cluster, this.settings, run, kind, domainIds, fn);
  }

  private domain(ctx: Ctx, key: string): Promise<DomainEntry> {
    return this.cluster.domains.get(ctx.rec.params[key] as string);
  }

  all(): Map<pb.OperationType, Flow> {
    const T = pb.OperationType;
    return new Map<pb.OperationType, Flow>([
      [T.OPERATION_TYPE_CREATE_STORAGE_DOMAIN, { run: (c) => this.createDomain(c) }],
      [T.OPERATION_TYPE_REMOVE_STORAGE_DOMAIN, { run: (c) => this.removeDomain(c) }],
      [T.OPERATION_TYPE_CREATE_DISK, { run: (c) => this.createDisk(c) }],
      [T.OPERATION_TYPE_DELETE_DISK, { run: (c) => this.deleteDisk(c) }],
      [T.OPERATION_TYPE_SNAPSHOT_DISK, { run: (c) => this.snapshotDisk(c) }],
      [T.OPERATION_TYPE_COPY_DISK, { run: (c) => this.copyDisk(c, false), rollback: (c) => this.rollbackCopy(c, false) }],
      [T.OPERATION_TYPE_MOVE_DISK, { run: (c) => this.copyDisk(c, true), rollback: (c) => this.rollbackCopy(c, true) }],
      [T.OPERATION_TYPE_IMPORT_DISK, { run: (c) => this.importDisk(c), rollback: (c) => this.rollbackCopy(c, false) }],
    ]);
  }

  // ------------------------------------------------------------------ domains

  private async createDomain(ctx: Ctx): Promise<OperationResult> {
    const p = ctx.rec.params as { domainId: string; name: string; path: string; warningFreePercent: number; criticalFreeBytes: number };
    await ctx.step('format-domain', (run) =>
      this.onHost(ctx, run, 'format_domain', [], async (h) => {
        await h.clients.metadata.formatDomain(
          { domainId: p.domainId, name: p.name, path: p.path, ioTimeoutSeconds: this.settings.domainIoTimeoutSeconds },
          { timeoutMs: 120_000, signal: ctx.signal },
        );
        return null;
      }),
    );
    const entry: DomainEntry = { id: p.domainId, name: p.name, path: p.path, warningFreePercent: p.warningFreePercent, criticalFreeBytes: p.criticalFreeBytes, createTimeMs: ctx.rec.op.createTime?.getTime() ?? Date.now() };
    await ctx.step('register-domain', async () => {
      await this.cluster.domains.put(entry);
      return null;
    });
    await ctx.step('connect-hosts', async () => {
      // Every healthy host starts joining the lockspace now (joining takes ~2·io_timeout), so
      // the first lease on the domain does not pay for it; a host that is down joins on first use.
      const joined: string[] = [];
      await Promise.all(
        this.cluster.hosts.healthy().map(async (h) => {
          try {
            await h.clients.leases.joinLockspace({ lockspace: entry.id, path: this.cluster.idsPath(entry), wait: false }, { timeoutMs: 10_000 });
            joined.push(h.spec.name);
          } catch (err) {
            ctx.log.warn({ host: h.spec.name, err: String(err) }, 'could not start joining the new lockspace');
          }
        }),
      );
      return joined.sort();
    });
    return { $case: 'storageDomain', storageDomain: await this.cluster.domainInfo(entry) };
  }

  private async removeDomain(ctx: Ctx): Promise<OperationResult> {
    const entry = await this.domain(ctx, 'domainId');
    await ctx.step('check-empty', async () => {
      const { images } = await this.cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, { timeoutMs: 15000 }));
      if (images.length > 0) throw failedPrecondition(`storage domain ${entry.id} still has ${images.length} disk(s)`, 'DOMAIN_NOT_EMPTY');
      return null;
    });
    // Before the hosts leave: a heartbeat in between must not tell them to join again.
    await ctx.step('mark-removing', async () => {
      await this.cluster.domains.markRemoving(entry.id);
      return null;
    });
    await ctx.step('leave-lockspaces', async () => {
      await Promise.all(
        this.cluster.hosts.healthy().map((h) =>
          h.clients.leases.leaveLockspace({ lockspace: entry.id, wait: true }, { timeoutMs: 30_000 }).catch((err: unknown) => ctx.log.warn({ host: h.spec.name, err: String(err) }, 'leave lockspace failed')),
        ),
      );
      return null;
    });
    await ctx.step('unregister-domain', async () => {
      await this.cluster.domains.remove(entry.id);
      return null;
    });
    return undefined;
  }

  // ------------------------------------------------------------------ disks

  private async createDisk(ctx: Ctx): Promise<OperationResult> {
    const p = ctx.rec.params as { domainId: string; diskId: string; volumeId: string; capacityBytes: number; format: pb.VolumeFormat; allocation: pb.VolumeAllocation; description: string };
    const entry = await this.domain(ctx, 'domainId');
    await ctx.step('create-volume', (run) =>
      this.onHost(ctx, run, 'create_volume', [entry.id], async (h) => {
        await h.clients.metadata.createVolume(
          { domainPath: entry.path, imageId: p.diskId, volumeId: p.volumeId, format: p.format, allocation: p.allocation, capacityBytes: p.capacityBytes, description: p.description, operationId: ctx.id },
          { timeoutMs: 300_000, signal: ctx.signal },
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: await this.cluster.disk(entry, p.diskId) };
  }

  private async deleteDisk(ctx: Ctx): Promise<OperationResult> {
    const p = ctx.rec.params as { domainId: string; diskId: string };
    const entry = await this.domain(ctx, 'domainId');
    await ctx.step('delete-image', (run) =>
      this.onHost(ctx, run, 'delete_image', [entry.id], async (h) => {
        await h.clients.metadata.deleteImage({ domainPath: entry.path, imageId: p.diskId, operationId: ctx.id }, { timeoutMs: 120_000, signal: ctx.signal }).catch(ignoreNotFound);
        return null;
      }),
    );
    return undefined;
  }

  private async snapshotDisk(ctx: Ctx): Promise<OperationResult> {
    const p = ctx.rec.params as { domainId: string; diskId: string; volumeId: string; description: string };
    const entry = await this.domain(ctx, 'domainId');
    const leafId = await ctx.step('inspect-disk', async () => {
      const vols = await this.cluster.volumes(entry, p.diskId);
      return vols[vols.length - 1]!.id;
    });
    await ctx.step('create-snapshot', (run) =>
      this.onHost(ctx, run, 'create_volume', [entry.id], async (h) => {
        await h.clients.metadata.createVolume(
          { domainPath: entry.path, imageId: p.diskId, volumeId: p.volumeId, parentId: leafId, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2, allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE, description: p.description, operationId: ctx.id },
          { timeoutMs: 120_000, signal: ctx.signal },
        );
        return null;
      }),
    );
    return { $case: 'disk', disk: await this.cluster.disk(entry, p.diskId) };
  }

  /**
   * Copy and Move: build the target chain in the target domain volume by volume, base first
   * (each created ILLEGAL, then filled by a data-mover copy job that makes it LEGAL), then, for
   * a move, delete the source. metadata-tx only snapshots LEGAL parents, so each target volume
   * is created after its parent was copied; the target stays invisible to users only through
   * the engine lock on the disk, and is deleted if anything fails.
   */
  private async copyDisk(ctx: Ctx, move: boolean): Promise<OperationResult> {
    const p = ctx.rec.params as { domainId: string; diskId: string; targetDomainId: string; targetDiskId: string; collapse: boolean; targetFormat: pb.VolumeFormat; volumeIds: Record<string, string> };
    const src = await this.domain(ctx, 'domainId');
    const dst = await this.domain(ctx, 'targetDomainId');
    const plan = await ctx.step('inspect-source', async () => {
      const vols = await this.cluster.volumes(src, p.diskId);
      const bad = vols.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
      if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${p.diskId} is ILLEGAL`, 'SOURCE_ILLEGAL');
      return vols.map((v): VolumePlan => ({ id: v.id, parentId: v.parentId, format: v.format, allocation: v.allocation, capacityBytes: v.capacityBytes, description: v.description }));
    });
    // Collapse: one target volume filled from the source leaf through its whole chain.
    const targets: Array<{ source: VolumePlan; targetId: string; targetParentId: string; format: pb.VolumeFormat; allocation: pb.VolumeAllocation }> = p.collapse
      ? [{ source: plan[plan.length - 1]!, targetId: p.volumeIds[plan[plan.length - 1]!.id]!, targetParentId: '', format: p.targetFormat || plan[0]!.format, allocation: plan[0]!.allocation }]
      : plan.map((v) => ({ source: v, targetId: p.volumeIds[v.id]!, targetParentId: v.parentId ? p.volumeIds[v.parentId]! : '', format: v.format, allocation: v.allocation }));
    const totalBytes = targets.reduce((s, t) => s + t.source.capacityBytes, 0);
    let doneBytes = 0;
    for (const t of targets) {
      await ctx.step(`create-target:${t.targetId}`, (run) =>
        this.onHost(ctx, run, 'create_volume', [dst.id], async (h) => {
          await h.clients.metadata.createVolume(
            {
              domainPath: dst.path,
              imageId: p.targetDiskId,
              volumeId: t.targetId,
              parentId: t.targetParentId,
              format: t.targetParentId ? pb.VolumeFormat.VOLUME_FORMAT_QCOW2 : t.format,
              allocation: t.targetParentId ? pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE : t.allocation,
              capacityBytes: t.source.capacityBytes,
              description: t.source.description,
              operationId: ctx.id,
              initiallyIllegal: true,
            },
            { timeoutMs: 300_000, signal: ctx.signal },
          );
          return null;
        }),
      );
      await ctx.step(`copy-volume:${t.targetId}`, (run) =>
        this.copyVolume(ctx, run, {
          source: { domain: src, imageId: p.diskId, volumeId: t.source.id },
          destination: { domain: dst, imageId: p.targetDiskId, volumeId: t.targetId },
          collapse: p.collapse,
          overall: (bytes) => ({ percent: totalBytes ? ((doneBytes + bytes) / totalBytes) * 100 : 0, bytesDone: doneBytes + bytes, bytesTotal: totalBytes, mbps: 0 }),
        }),
      );
      doneBytes += t.source.capacityBytes;
    }
    if (move) {
      await ctx.step('delete-source', (run) =>
        this.onHost(ctx, run, 'delete_image', [src.id], async (h) => {
          await h.clients.metadata.deleteImage({ domainPath: src.path, imageId: p.diskId, operationId: ctx.id }, { timeoutMs: 120_000 }).catch(ignoreNotFound);
          return null;
        }),
      );
    }
    return { $case: 'disk', disk: toDisk(dst.id, p.targetDiskId, await this.cluster.volumes(dst, p.targetDiskId)) };
  }

  /**
   * Import: inspect the file on the named host → create the target volume ILLEGAL (capacity =
   * the file's virtual size rounded up to 512; the requested format or the file's) on any host
   * → copy the file into it on the named host (the file is only there) → LEGAL. A failure
   * deletes the target (rollbackCopy).
   */
  private async importDisk(ctx: Ctx): Promise<OperationResult> {
    const p = ctx.rec.params as { targetDomainId: string; targetDiskId: string; volumeId: string; host: string; sourcePath: string; format: pb.VolumeFormat; description: string };
    const dst = await this.domain(ctx, 'targetDomainId');
    const file = await ctx.step('inspect-file', async (run) => {
      await run.setHost(p.host);
      const h = this.cluster.hosts.get(p.host);
      if (!h) throw notFound(`host ${p.host} is no longer known`, 'HOST_NOT_FOUND');
      const info = await h.clients.mover.inspectFile({ path: p.sourcePath }, { timeoutMs: 60_000, signal: ctx.signal });
      return { format: info.format, virtualSizeBytes: info.virtualSizeBytes, actualSizeBytes: info.actualSizeBytes };
    });
    const capacityBytes = Math.ceil(file.virtualSizeBytes / 512) * 512;
    await ctx.step(`create-target:${p.volumeId}`, (run) =>
      this.onHost(ctx, run, 'create_volume', [dst.id], async (h) => {
        await h.clients.metadata.createVolume(
          {
            domainPath: dst.path,
            imageId: p.targetDiskId,
            volumeId: p.volumeId,
            format: p.format || file.format,
            allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
            capacityBytes,
            description: p.description,
            operationId: ctx.id,
            initiallyIllegal: true,
          },
          { timeoutMs: 300_000, signal: ctx.signal },
        );
        return null;
      }),
    );
    await ctx.step(`import-volume:${p.volumeId}`, (run) =>
      this.copyVolume(ctx, run, {
        source: { file: p.sourcePath },
        destination: { domain: dst, imageId: p.targetDiskId, volumeId: p.volumeId },
        collapse: false,
        pinnedHost: p.host,
        overall: (bytes) => ({ percent: capacityBytes ? (bytes / capacityBytes) * 100 : 0, bytesDone: bytes, bytesTotal: capacityBytes, mbps: 0 }),
      }),
    );
    return { $case: 'disk', disk: toDisk(dst.id, p.targetDiskId, await this.cluster.volumes(dst, p.targetDiskId)) };
  }

  /** A failed copy, move or import: delete whatever of the target exists; the source was never touched. */
  private async rollbackCopy(ctx: Ctx, move: boolean): Promise<void> {
    const results = (ctx.rec.state.results ?? {}) as Record<string, unknown>;
    if (move && 'delete-source' in results) return; // committed: the target is the disk now
    const p = ctx.rec.params as { targetDomainId: string; targetDiskId: string };
    const dst = await this.domain(ctx, 'targetDomainId');
    await ctx.step('rollback:delete-target', (run) =>
      this.onHost(ctx, run, 'delete_image', [dst.id], async (h) => {
        // Stop any copy job of ours that may still run, so it does not hold the target's leases.
        await this.abortCopyJobs(ctx);
        // A job on a dead host keeps the target's volume lease until sanlock calls the host
        // dead: metadata-tx refuses with VOLUME_IN_USE meanwhile, so retry until fenceTimeout.
        const until = Date.now() + this.settings.fenceTimeoutMs;
        for (;;) {
          try {
            await h.clients.metadata.deleteImage({ domainPath: dst.path, imageId: p.targetDiskId, operationId: ctx.id }, { timeoutMs: 120_000 }).catch(ignoreNotFound);
            return null;
          } catch (err) {
            const reason = SdmeshError.from(err).reason;
            if ((reason !== 'VOLUME_IN_USE' && reason !== 'LEASE_HELD') || Date.now() > until) throw err;
            await sleep(2000, ctx.signal);
          }
        }
      }),
    );
  }

  private async abortCopyJobs(ctx: Ctx): Promise<void> {
    const scratch = (ctx.rec.state.scratch ?? {}) as Record<string, CopyScratch>;
    for (const [key, sc] of Object.entries(scratch)) {
      if (!key.startsWith('copy:') || !sc.jobId || !sc.host) continue;
      const h = this.cluster.hosts.get(sc.host);
      if (!h?.healthy) continue;
      await h.clients.mover.abortJob({ jobId: sc.jobId }, { timeoutMs: 30_000 }).catch(() => undefined);
    }
  }

  // ------------------------------------------------------------------ one volume copy

  /**
   * One data-mover job, followed to its end. When the host running it dies (or its job is
   * lost), the destination is fenced before a retry elsewhere: wait until no live host holds
   * the destination's volume lease (a dead host's lease is only free after sanlock's
   * host_dead), then bump its generation, so a late writer fails its generation check.
   */
  private async copyVolume(
    ctx: Ctx,
    run: StepRun,
    c: CopySpec,
  ): Promise<{ host: string; generation: number }> {
    const key = `copy:${c.destination.volumeId}`;
    const source = 'file' in c.source ? undefined : { domainPath: c.source.domain.path, imageId: c.source.imageId, volumeId: c.source.volumeId };
    const destination = { domainPath: c.destination.domain.path, imageId: c.destination.imageId, volumeId: c.destination.volumeId };
    const sc: CopyScratch = ctx.scratch<CopyScratch>(key) ?? { attempt: 0, excluded: [] };
    const fenceUntil = () => Date.now() + this.settings.fenceTimeoutMs;
    let release = () => undefined as void;
    try {
      return await this.copyVolumeAttempts(ctx, run, c, key, source, destination, sc, fenceUntil, (r) => (release = r));
    } finally {
      release();
    }
  }

  private async copyVolumeAttempts(
    ctx: Ctx,
    run: StepRun,
    c: CopySpec,
    key: string,
    source: pb.VolumeRef | undefined,
    destination: pb.VolumeRef,
    initial: CopyScratch,
    fenceUntil: () => number,
    setRelease: (r: () => void) => void,
  ): Promise<{ host: string; generation: number }> {
    let sc = initial;
    let release = () => undefined as void;
    const sourceFile = 'file' in c.source ? c.source.file : '';
    const sourceDomainIds = 'file' in c.source ? [] : [c.source.domain.id];
    const what = 'file' in c.source ? `file ${c.source.file} on ${c.pinnedHost}` : `volume ${c.source.volumeId}`;
    for (;;) {
      if (!sc.jobId) {
        const vol = await this.cluster.read([c.destination.domain.id], (h) => h.clients.metadata.getVolume(destination, { timeoutMs: 15000 }));
        const generation = vol.volume!.generation;
        let placed: ReturnType<Cluster['hosts']['place']> | undefined;
        const waitUntil = Date.now() + this.settings.placementWaitMs;
        while (!placed) {
          try {
            placed = c.pinnedHost
              ? this.cluster.hosts.placeOn(c.pinnedHost, 'import_volume', [c.destination.domain.id])
              : this.cluster.hosts.place('copy_volume', [...sourceDomainIds, c.destination.domain.id], new Set(sc.excluded));
          } catch (err) {
            if (SdmeshError.from(err).code !== GrpcStatus.UNAVAILABLE || Date.now() > waitUntil) throw err;
            if (this.cluster.hosts.healthy().every((h) => sc.excluded.includes(h.spec.name))) sc.excluded = [];
            await sleep(1000, ctx.signal);
          }
        }
        // Counted on the host until the job ends, so concurrent copies spread before the
        // data-mover's own load report catches up.
        release();
        release = placed.done;
        setRelease(release);
        const attempt = sc.attempt + 1;
        sc = { ...sc, attempt, host: placed.host.spec.name, jobId: `${ctx.id}.${c.destination.volumeId}.${attempt}`, generation };
        // Persist before starting the job: a resumed run re-attaches to it instead of starting another.
        await ctx.saveScratch(key, sc);
        await run.setHost(sc.host!, sc.attempt);
      }
      const host = this.cluster.hosts.get(sc.host!);
      let job: pb.Job | undefined;
      let hostFailure: unknown;
      try {
        if (!host) throw unavailable(`host ${sc.host} is no longer known`, 'HOST_UNKNOWN');
        await host.clients.mover.copyVolume(
          { jobId: sc.jobId!, source, sourceFile, destination, destinationGeneration: sc.generation!, collapse: c.collapse, rateLimitBytesPerSecond: this.settings.copyRateLimitBytesPerSecond },
          { timeoutMs: 30_000, signal: ctx.signal },
        );
        job = await this.followJob(ctx, run, host, sc.jobId!, c.overall);
      } catch (err) {
        if (ctx.signal.aborted) {
          if (isCancel(ctx.signal.reason) && host) await host.clients.mover.abortJob({ jobId: sc.jobId! }, { timeoutMs: 30_000 }).catch(() => undefined);
          throw ctx.signal.reason;
        }
        const e = SdmeshError.from(err);
        if (isHostUnreachable(err) || (e.code === GrpcStatus.NOT_FOUND && e.reason === 'JOB_NOT_FOUND')) hostFailure = err;
        else if (e.code === GrpcStatus.ABORTED && e.reason === 'DESTINATION_BUSY') hostFailure = err;
        else throw err;
      }
      if (job?.status === pb.JobStatus.JOB_STATUS_DONE) return { host: sc.host!, generation: job.resultGeneration };
      const reason = job?.error?.reason ?? '';
      if (job && !['LEASE_HELD', 'LEASE_HELD_ON_THIS_HOST', 'LEASE_LOST', 'WORKER_DIED'].includes(reason) && job.status !== pb.JobStatus.JOB_STATUS_ABORTED) {
        throw new SdmeshError(job.error?.code || GrpcStatus.INTERNAL, `copy of ${what} failed on ${sc.host}: ${job.error?.message ?? 'unknown error'}`, reason || 'COPY_FAILED');
      }
      // The host died, lost its lease, or the destination is still held (by a dead host's job): fence, then retry.
      const failedHost = sc.host!;
      ctx.log.warn({ host: failedHost, job: sc.jobId, reason: reason || String(hostFailure) }, 'copy step lost its host or lease; fencing the destination before a retry');
      if (hostFailure) {
        this.cluster.hosts.markFailed(failedHost, String(hostFailure));
        if (!sc.excluded.includes(failedHost)) sc.excluded = [...sc.excluded, failedHost];
      }
      await this.fenceDestination(ctx, c.destination, fenceUntil());
      sc = { ...sc, jobId: undefined, host: undefined, generation: undefined };
      await ctx.saveScratch(key, sc);
      if (sc.attempt >= 10) throw new SdmeshError(GrpcStatus.ABORTED, `copy of ${what} failed ${sc.attempt} times`, 'TOO_MANY_ATTEMPTS');
    }
  }

  private async followJob(ctx: Ctx, run: StepRun, host: HostState, jobId: string, overall: (bytes: number) => pb.Progress): Promise<pb.Job> {
    let last: pb.Job | undefined;
    for await (const job of host.clients.mover.watchJob({ jobId }, { signal: ctx.signal })) {
      last = job;
      if (job.progress) await run.progress(job.progress, overall(job.progress.bytesDone));
      if (job.status === pb.JobStatus.JOB_STATUS_DONE || job.status === pb.JobStatus.JOB_STATUS_FAILED || job.status === pb.JobStatus.JOB_STATUS_ABORTED) return job;
    }
    // The stream ended without a final state: ask once.
    last = await host.clients.mover.getJob({ jobId }, { timeoutMs: 10_000 });
    if (last.status === pb.JobStatus.JOB_STATUS_DONE || last.status === pb.JobStatus.JOB_STATUS_FAILED || last.status === pb.JobStatus.JOB_STATUS_ABORTED) return last;
    throw unavailable(`job ${jobId} on ${host.spec.name} stopped reporting`, 'JOB_STREAM_ENDED');
  }

  /** Waits until no live host holds the destination's volume lease, then bumps its generation. */
  private async fenceDestination(ctx: Ctx, d: { domain: DomainEntry; imageId: string; volumeId: string }, until: number): Promise<void> {
    const ref = { domainPath: d.domain.path, imageId: d.imageId, volumeId: d.volumeId };
    for (;;) {
      const vol = (await this.cluster.read([d.domain.id], (h) => h.clients.metadata.getVolume(ref, { timeoutMs: 15000 }))).volume!;
      const free = await this.cluster
        .read([d.domain.id], async (h) => {
          const owner = await h.clients.leases.getLeaseOwner({ lease: vol.lease }, { timeoutMs: 10_000 });
          if (owner.ownerHostIds.length === 0) return true;
          const { hosts } = await h.clients.leases.listLockspaceHosts({ lockspace: d.domain.id }, { timeoutMs: 10_000 });
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
      if (free) {
        try {
          await this.cluster.read([d.domain.id], (h) =>
            h.clients.metadata.updateVolume({ ...ref, generation: vol.generation, bumpGeneration: true, operationId: ctx.id }, { timeoutMs: 60_000 }),
          );
          ctx.log.info({ volume: d.volumeId, generation: vol.generation + 1 }, 'destination fenced (generation bumped)');
          return;
        } catch (err) {
          const reason = SdmeshError.from(err).reason;
          // GENERATION_MISMATCH: a late job moved it meanwhile, read again. VOLUME_IN_USE: metadata-tx
          // could not take the volume lease (a dead host's job still holds it until host_dead).
          if (reason !== 'GENERATION_MISMATCH' && reason !== 'VOLUME_IN_USE' && reason !== 'LEASE_HELD') throw err;
          if (reason === 'GENERATION_MISMATCH') continue;
        }
      }
      if (Date.now() > until) {
        throw new SdmeshError(GrpcStatus.ABORTED, `the destination volume ${d.volumeId} is still held by a live host after ${this.settings.fenceTimeoutMs} ms`, 'FENCE_TIMEOUT');
      }
      await sleep(2000, ctx.signal);
    }
  }
}
