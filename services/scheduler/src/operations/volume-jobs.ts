import { failedPrecondition, parseBitmaps, parseQcow2Compat, pb, Reason } from '@sdmesh/common';
import { bounded, type CallBound, type Cluster } from '../cluster';
import type { DomainEntry } from '../domains';
import type { FlowContext, OperationResult } from '../engine';
import { checkUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { diskLock, diskResource, domainLock, registeredDomain, type Prepared, type PrepareEnv, type RunEnv } from './operation';
import { copyVolume } from './volume-copy';

/**
 * What the in-place disk operations share (extend-disk.ts, sparsify-disk.ts, amend-disk.ts,
 * disk-bitmaps.ts): the disk they change, checked in prepare, and their steps, each one data-mover
 * volume job on one volume (StartVolumeJob) placed, followed, fenced and retried like a copy
 * (volume-copy.ts): a job whose worker or host died is fenced through the volume's generation and
 * run again on a healthy host.
 */

/** A disk an in-place operation may change: registered domain, existing disk, every volume LEGAL, not a template. */
export async function changeableDisk(
  env: PrepareEnv,
  req: { storageDomainId: string; diskId: string },
): Promise<{ entry: DomainEntry; diskId: string; volumes: pb.Volume[] }> {
  const entry = await registeredDomain(env, req.storageDomainId);
  const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
  const volumes = await env.cluster.volumes(entry, diskId, env.call);
  if (volumes.some((v) => v.template)) throw failedPrecondition(`disk ${diskId} is a template: read-only for good`, Reason.DISK_IS_TEMPLATE);
  const bad = volumes.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
  if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${diskId} is ILLEGAL`, Reason.DISK_ILLEGAL);
  return { entry, diskId, volumes };
}

/** The engine locks of an in-place disk operation: the disk exclusive, its domain shared; the disk is its target. */
export function inPlaceDiskLocks(domainId: string, diskId: string): Omit<Prepared<unknown>, 'params'> {
  return { locks: [diskLock(diskId, 'exclusive'), domainLock(domainId, 'shared')], targetResources: [diskResource(domainId, diskId)] };
}

/** An in-place operation's run: its volume jobs, then the disk as they left it. */
export async function runDiskVolumeJobs(
  env: RunEnv,
  ctx: FlowContext<unknown>,
  p: { domainId: string; diskId: string },
  steps: VolumeJobStep[],
): Promise<OperationResult> {
  const entry = await env.cluster.domains.get(p.domainId);
  await runVolumeJobs(env, ctx, entry, p.diskId, steps);
  return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId) };
}

/** One volume job of an operation: a named step. */
export interface VolumeJobStep {
  /** Step name, e.g. `extend:<volume>`. */
  name: string;
  volumeId: string;
  operation: pb.StartVolumeJobRequest['operation'];
  resumeIllegal?: boolean;
}

/** Runs the steps one after the other (each once: a resumed operation skips the done ones); the operation's progress counts steps. */
export async function runVolumeJobs(env: RunEnv, ctx: FlowContext<unknown>, domain: DomainEntry, diskId: string, steps: VolumeJobStep[]): Promise<void> {
  for (const [i, s] of steps.entries()) {
    await ctx.step(s.name, (run) =>
      copyVolume(env, ctx, run, {
        source: { volumeJob: { operation: s.operation, resumeIllegal: !!s.resumeIllegal } },
        destination: { domain, imageId: diskId, volumeId: s.volumeId },
        label: s.name.replace(/[^A-Za-z0-9._-]/g, '-'),
        collapse: false,
        overall: (_bytes) => ({ percent: ((i + 0.5) / steps.length) * 100, bytesDone: 0, bytesTotal: 0, mbps: 0 }),
      }),
    );
  }
}

/** The dirty bitmaps and qcow2 compat level of each volume of a disk, base first (metadata-tx GetVolume's qemu-img info). */
export async function diskBitmaps(cluster: Cluster, entry: DomainEntry, diskId: string, volumes: pb.Volume[], bound?: CallBound): Promise<pb.VolumeBitmaps[]> {
  const out: pb.VolumeBitmaps[] = [];
  for (const v of volumes) {
    if (v.format !== pb.VolumeFormat.VOLUME_FORMAT_QCOW2) {
      out.push({ volumeId: v.id, format: v.format, qcow2Compat: '', bitmaps: [] });
      continue;
    }
    const res = await cluster.read([entry.id], (h) =>
      h.clients.metadata.getVolume({ domainPath: entry.path, imageId: diskId, volumeId: v.id }, bounded(bound, CALL_TIMEOUT_MS.getVolume)),
    );
    const info = res.qemuInfo?.json || '{}';
    out.push({
      volumeId: v.id,
      format: v.format,
      qcow2Compat: parseQcow2Compat(info),
      bitmaps: parseBitmaps(info).map((b) => ({
        name: b.name,
        granularityBytes: b.granularity,
        enabled: b.flags.includes('auto'),
        inUse: b.flags.includes('in-use'),
      })),
    });
  }
  return out;
}

/** ListDiskBitmaps: a read, no lock. */
export async function listDiskBitmaps(env: Pick<PrepareEnv, 'cluster' | 'call'>, req: pb.ListDiskBitmapsRequest): Promise<pb.ListDiskBitmapsResponse> {
  const entry = await registeredDomain(env, req.storageDomainId);
  const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
  return { volumes: await diskBitmaps(env.cluster, entry, diskId, await env.cluster.volumes(entry, diskId, env.call), env.call) };
}
