#!/usr/bin/env node
import { MAX_HOST_ID, pb, resolveGroup, runService, service, setStorageGroup, storageRootsOption, StorageRoots } from '@sdmesh/common';
import { dataMoverHandlers } from './handlers';
import { JobManager } from './jobs';
import { resolveImportDirs } from './source-file';
import { startTransferEndpoint, transferEndpointOptions } from './transfer/registry';

void runService({
  name: 'data-mover',
  summary: 'data-mover: long data operations (copies) under volume leases only.',
  options: {
    hostId: {
      type: 'int',
      description: "This host's sanlock host id (1..250; 0 = unknown), recorded in record temp-file names.",
      default: 0,
      min: 0,
      max: MAX_HOST_ID,
    },
    leaseManagerAddress: {
      type: 'string',
      description: "Address of this host's lease-manager. Empty: the service runs (checksums, host load) but refuses copies.",
      default: '',
    },
    maxConcurrentJobs: { type: 'int', description: 'Copy jobs running at once on this host; more wait in a FIFO queue.', default: 2, min: 1, max: 64 },
    sourceLeaseWaitMs: {
      type: 'int',
      description: "How long a copy waits for the source's shared lease while another process on this host reads it.",
      default: 120_000,
      min: 0,
    },
    abortGraceMs: {
      type: 'int',
      description: 'After an abort, time a worker gets to stop qemu-img and release its leases before SIGKILL.',
      default: 15_000,
      min: 100,
    },
    importDirs: {
      type: 'string',
      description: 'Comma-separated directories ImportDisk may read files from (empty: imports disabled). Never /, /proc, /sys, /dev.',
      default: '',
    },
    storageGroup: {
      type: 'string',
      description: "Group (name or gid) of the files and directories it creates in domains, e.g. the hypervisor's kvm (empty: the process's).",
      default: '',
    },
    storageRoots: storageRootsOption,
    // Image transfer (issue 19): the HTTPS data endpoint.
    ...transferEndpointOptions,
    warmWorkers: {
      type: 'int',
      description: 'Copy workers kept started and registered with sanlock, idle (no lease), ready for the next jobs; 0: each job starts one.',
      default: 3,
      min: 0,
      max: 16,
    },
    jobRetentionMs: {
      type: 'int',
      description: 'How long finished jobs stay visible to GetJob/ListJobs and idempotent CopyVolume.',
      default: 3_600_000,
      min: 0,
    },
  },
  async start(ctx) {
    const { hostId, leaseManagerAddress, maxConcurrentJobs, sourceLeaseWaitMs, abortGraceMs, jobRetentionMs, warmWorkers } = ctx.config;
    const importDirs = await resolveImportDirs(ctx.config.importDirs);
    const roots = new StorageRoots(ctx.config.storageRoots, `data-mover on ${ctx.hostName}`);
    if (!roots.configured) ctx.log.warn('no --storage-roots (SDMESH_STORAGE_ROOTS): every copy and checksum is refused');
    const storageGroupId = ctx.config.storageGroup ? await resolveGroup(ctx.config.storageGroup) : undefined;
    setStorageGroup(storageGroupId);
    ctx.log.info({ importDirs }, importDirs.length ? 'imports read only from these directories' : 'no --import-dirs: imports are disabled');
    if (!leaseManagerAddress) ctx.log.warn('no --lease-manager-address: copies are refused (NO_LEASE_MANAGER); checksums and load reports work');
    const jobs = new JobManager({
      hostName: ctx.hostName,
      maxConcurrentJobs,
      workerConfig: { leaseManagerAddress, hostId, hostName: ctx.hostName, logLevel: ctx.config.logLevel, sourceLeaseWaitMs, importDirs, storageGroupId },
      registry: ctx.metrics.registry,
      events: ctx.events,
      log: ctx.log,
      abortGraceMs,
      retentionMs: jobRetentionMs,
      warmWorkers,
    });
    const transfers = await startTransferEndpoint({ ...ctx, storageGroupId });
    return {
      services: [service(pb.DataMoverServiceDefinition, dataMoverHandlers(jobs, roots, { registry: transfers, metrics: ctx.metrics.registry }))],
      stop: async () => {
        await transfers?.stop();
        await jobs.stop();
      },
    };
  },
});
