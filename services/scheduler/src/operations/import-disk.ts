import { failedPrecondition, invalidArgument, notFound, pb, Reason, unavailable, validateCapacity, validateDescription } from '@sdmesh/common';
import { bounded, toDisk } from '../cluster';
import { derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { deleteTarget } from './copy-disk';
import { checkEnum, diskLock, diskResource, domainLock, registeredDomain, roundUpToSector, type OperationKind, type PrepareEnv } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';
import { copyVolume } from './volume-copy';

/**
 * Import Disk: a raw/qcow2 file only `host` can read becomes a new one-volume disk.
 *   1. `inspect-file` on the named host;
 *   2. `create-target:<vol>`: the volume, ILLEGAL (capacity = the file's virtual size rounded up
 *      to 512; the requested format or the file's), on any host reaching the domain;
 *   3. `import-volume:<vol>`: a data-mover job from the file, pinned to the named host (the file
 *      is only there), same fencing as a copy → LEGAL.
 * Rollback: `rollback:delete-target`. Locks: the new disk exclusive, the domain shared.
 */
export interface ImportDiskParams {
  targetDomainId: string;
  targetDiskId: string;
  volumeId: string;
  host: string;
  sourcePath: string;
  format: pb.VolumeFormat;
  description: string;
}

export const importDisk: OperationKind<pb.ImportDiskRequest, ImportDiskParams> = {
  type: pb.OperationType.OPERATION_TYPE_IMPORT_DISK,
  waitForLocks: () => false,

  async prepare(env, req, operationId) {
    const entry = await registeredDomain(env, req.storageDomainId);
    checkEnum('format', req.format, pb.VolumeFormat, Reason.INVALID_FORMAT);
    const description = validateDescription(req.description);
    const sourcePath = validateSourcePath(req.sourcePath);
    const host = readingHost(env, req.host, entry.id);
    // Ask the host now, so a missing, unreadable or unsupported file fails the call and
    // nothing is stored (the flow inspects it again).
    const info = await host.clients.mover.inspectFile({ path: sourcePath }, bounded(env.call, CALL_TIMEOUT_MS.inspectFile));
    validateCapacity(roundUpToSector(info.virtualSizeBytes));
    await env.cluster.checkSpaceForAllocation(entry, info.actualSizeBytes, env.call);
    const diskId = derivedUuid(operationId, 'disk');
    return {
      params: {
        targetDomainId: entry.id,
        targetDiskId: diskId,
        volumeId: derivedUuid(operationId, 'volume'),
        host: host.spec.name,
        sourcePath,
        format: req.format,
        description,
      },
      locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const dst = await env.cluster.domains.get(p.targetDomainId);
    const file = await ctx.step('inspect-file', async (run) => {
      await run.setHost(p.host);
      const h = env.cluster.hosts.get(p.host);
      if (!h) throw notFound(`host ${p.host} is no longer known`, Reason.HOST_NOT_FOUND);
      const info = await h.clients.mover.inspectFile({ path: p.sourcePath }, stepCall(ctx, CALL_TIMEOUT_MS.inspectFile));
      return { format: info.format, virtualSizeBytes: info.virtualSizeBytes, actualSizeBytes: info.actualSizeBytes };
    });
    const capacityBytes = roundUpToSector(file.virtualSizeBytes);
    await ctx.step(`create-target:${p.volumeId}`, (run) =>
      onPlacedHost(env, ctx, run, { kind: 'create_volume', domainIds: [dst.id] }, async (h) => {
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
          stepCall(ctx, CALL_TIMEOUT_MS.createVolume),
        );
        return null;
      }),
    );
    await ctx.step(`import-volume:${p.volumeId}`, (run) =>
      copyVolume(env, ctx, run, {
        source: { file: p.sourcePath },
        destination: { domain: dst, imageId: p.targetDiskId, volumeId: p.volumeId },
        collapse: false,
        pinnedHost: p.host,
        overall: (bytes) => ({ percent: capacityBytes ? (bytes / capacityBytes) * 100 : 0, bytesDone: bytes, bytesTotal: capacityBytes, mbps: 0 }),
      }),
    );
    return { $case: 'disk', disk: toDisk(dst.id, p.targetDiskId, await env.cluster.volumes(dst, p.targetDiskId)) };
  },

  rollback: (env, ctx) => deleteTarget(env, ctx, { move: false }),
};

/** The named host, known, healthy and reaching the domain: the only one that can read the file. */
function readingHost(env: PrepareEnv, name: string, domainId: string) {
  if (!name) throw invalidArgument('host is required (the host that can read source_path)', Reason.INVALID_HOST);
  const host = env.cluster.hosts.get(name);
  if (!host) throw notFound(`host ${name.slice(0, 64)} is not known`, Reason.HOST_NOT_FOUND);
  if (host.maintenance) throw failedPrecondition(`host ${host.spec.name} is in maintenance: activate it first`, Reason.HOST_IN_MAINTENANCE);
  if (!host.healthy) throw unavailable(`host ${host.spec.name} is not healthy right now: the file can only be read there`, Reason.HOST_UNAVAILABLE);
  if (!env.cluster.hosts.reaches(host, domainId))
    throw failedPrecondition(`host ${host.spec.name} does not reach storage domain ${domainId}`, Reason.HOST_CANNOT_REACH_DOMAIN);
  return host;
}

/** An import's source path: absolute and normalized (no "." / ".." segments, no double or trailing slash). */
export function validateSourcePath(value: string): string {
  const bad = (why: string) => invalidArgument(`source_path ${JSON.stringify(String(value).slice(0, 200))} ${why}`, Reason.INVALID_PATH);
  if (typeof value !== 'string' || !value) throw invalidArgument('source_path is required', Reason.INVALID_PATH);
  if (value.length > 4096) throw bad('is too long');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(value)) throw bad('contains control characters');
  if (!value.startsWith('/')) throw bad('is not absolute');
  const segments = value.split('/').slice(1);
  if (segments.includes('..') || segments.includes('.')) throw bad('contains "." or ".." segments');
  if (segments.includes('') || value === '/') throw bad('is not normalized (double or trailing slash)');
  return value;
}
