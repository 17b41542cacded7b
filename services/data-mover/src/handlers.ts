import { pb, VOLUME_FORMAT, type ServiceHandlers, type StorageRoots } from '@sdmesh/common';
import type { Registry } from 'prom-client';
import { checksumVolume } from './checksum';
import type { JobManager } from './jobs';
import { inspectSourceFile } from './source-file';
import { transferHandlers } from './transfer-rpc';
import type { TransferRegistry } from './transfer/tickets';

/**
 * gRPC handlers of DataMoverService: thin wrappers over the job manager and the checksum.
 * Every volume named lies in a domain beneath one of the host's storage roots.
 */
export function dataMoverHandlers(
  jobs: JobManager,
  roots: StorageRoots,
  transfers: { registry?: TransferRegistry; metrics: Registry },
): ServiceHandlers<typeof pb.DataMoverServiceDefinition> {
  const check = (what: string, ref: pb.VolumeRef | undefined) => {
    if (ref) roots.requireUnder(ref.domainPath, `${what} domain path`);
  };
  return {
    ...transferHandlers(transfers.registry, roots, transfers.metrics),
    copyVolume: (req) => {
      check('source', req.source);
      check('destination', req.destination);
      return jobs.copy(req);
    },
    startVolumeJob: (req) => {
      check('volume', req.volume);
      return jobs.volumeJob(req);
    },
    getJob: async (req) => jobs.get(req.jobId),
    listJobs: async () => ({ jobs: jobs.list() }),
    abortJob: (req, ctx) => jobs.abort(req.jobId, `AbortJob from ${ctx.peer}`, ctx.signal),
    watchJob: (req, ctx) => jobs.watch(req.jobId, ctx.signal),
    checksumVolume: async (req, ctx) => {
      check('volume', req.volume);
      const r = await checksumVolume(req.volume, ctx.signal);
      return { algorithm: r.algorithm, checksum: r.checksum, bytes: r.bytes };
    },
    getHostLoad: async () => jobs.load(),
    inspectFile: async (req, ctx) => {
      const f = await inspectSourceFile(req.path, jobs.importDirs, ctx.signal);
      return {
        path: f.path,
        format: VOLUME_FORMAT.toPb(f.format),
        virtualSizeBytes: f.virtualSize,
        actualSizeBytes: f.actualSize,
        fileSizeBytes: f.fileSize,
      };
    },
  };
}
