#!/usr/bin/env node
import { LeaseHolder, pb, runService, service, storageRootsOption, StorageRoots } from '@sdmesh/common';
import { GarbageCollector, type GcLeaseProvider } from './collector';
import { GcFaultInjector } from './faults';
import { GcService } from './gc-service';
import { LeaseWorkers } from './lease-workers';
import { sanlockLeases } from './leases';
import { GcMetrics } from './metrics';

void runService({
  name: 'gc',
  summary: 'gc: removes what interrupted transactions and deletes left behind; one active host per domain (the GC lease holder).',
  options: {
    leaseManagerAddress: { type: 'string', description: "Address of this host's lease-manager (empty = list garbage only, never collect).", default: '' },
    domains: { type: 'string', description: 'Comma-separated absolute paths of storage domains to collect (each beneath a storage root).', default: '' },
    storageRoots: {
      ...storageRootsOption,
      description: `${storageRootsOption.description} Every direct subdirectory of a root holding dom_md/metadata is collected too.`,
    },
    intervalMs: { type: 'int', description: 'Pause between periodic rounds over all domains (0 = collect only on request).', default: 60000, min: 0 },
    graceMs: { type: 'int', description: 'Leave garbage younger than this for a later pass.', default: 60000, min: 0 },
    batchMaxItems: { type: 'int', description: 'Most items removed per hold of the domain metadata lease.', default: 2000, min: 1 },
    batchMaxMs: { type: 'int', description: 'Longest hold of the domain metadata lease per batch (ms; items started by then finish).', default: 250, min: 1 },
    soloBatchMaxItems: {
      type: 'int',
      description: "Most items of a batch taken when the domain lease's version shows nobody else held it since the pass's previous batch.",
      default: 8000,
      min: 1,
    },
    soloBatchMaxMs: {
      type: 'int',
      description: 'Longest such batch (ms): a transaction that starts waiting for the domain lease meanwhile waits at most about this long.',
      default: 1000,
      min: 1,
    },
    batchPauseMs: { type: 'int', description: 'Pause between batches, so transactions waiting for the domain lease get it (ms).', default: 50, min: 0 },
    parallelItems: {
      type: 'int',
      description: 'Independent garbage items removed at once (their volume leases are taken up to 8 per sanlock command, a group per lease worker).',
      default: 32,
      min: 1,
      max: 64,
    },
    leaseWorkers: {
      type: 'int',
      description: 'Processes that hold volume leases for the parallel items (sanlock runs one command per process at a time; 0 = all leases in this process).',
      default: 4,
      min: 0,
      max: 16,
    },
    backlogThreshold: { type: 'int', description: 'Backlog (items) above which a domain counts as behind.', default: 1000, min: 0 },
    backlogPasses: { type: 'int', description: 'Passes in a row above the threshold before a BACKLOG_HIGH event.', default: 3, min: 1 },
    faultPoint: { type: 'string', description: 'Testing only: SIGKILL this process at the named fault point.', env: 'SDMESH_FAULT_POINT', default: '' },
  },
  async start(ctx) {
    const c = ctx.config;
    const roots = new StorageRoots(c.storageRoots, `gc on ${ctx.hostName}`);
    if (!roots.configured) ctx.log.warn('no --storage-roots (SDMESH_STORAGE_ROOTS): no domain is collected');
    const domains = c.domains
      .split(',')
      .map((d) => d.trim())
      .filter(Boolean);
    for (const d of domains) {
      if (!d.startsWith('/')) throw new Error(`--domains: "${d}" is not an absolute path`);
      try {
        roots.requireUnder(d);
      } catch (err) {
        throw new Error(`--domains: ${(err as Error).message}`);
      }
    }
    const faults = new GcFaultInjector(c.faultPoint);
    if (c.faultPoint) ctx.log.warn({ faultPoint: c.faultPoint }, 'fault injection armed: this process will SIGKILL itself at that point');

    let holder: LeaseHolder | undefined;
    let workers: LeaseWorkers | undefined;
    let leases: GcLeaseProvider;
    if (c.leaseManagerAddress) {
      // This process holds the GC, domain and volume leases: sanlock fences it if the host
      // loses a lockspace, and its leases die with it.
      holder = await LeaseHolder.register({ leaseManagerAddress: c.leaseManagerAddress, log: ctx.log });
      if (c.leaseWorkers > 0) workers = new LeaseWorkers({ count: c.leaseWorkers, leaseManagerAddress: c.leaseManagerAddress, log: ctx.log });
      leases = sanlockLeases(holder, workers);
    } else {
      ctx.log.warn('no lease-manager address: this gc lists garbage but never collects (collecting needs sanlock leases)');
      const refuse = (): never => {
        throw new Error('no lease-manager');
      };
      leases = { withGcLease: refuse, withDomainLease: refuse, withVolumeLease: refuse };
    }

    const collector = new GarbageCollector({
      leases,
      hostName: ctx.hostName,
      graceMs: c.graceMs,
      batchMaxItems: c.batchMaxItems,
      batchMaxMs: c.batchMaxMs,
      soloBatchMaxItems: c.soloBatchMaxItems,
      soloBatchMaxMs: c.soloBatchMaxMs,
      batchPauseMs: c.batchPauseMs,
      parallelItems: c.parallelItems,
      backlogThreshold: c.backlogThreshold,
      backlogPasses: c.backlogPasses,
      faults,
      events: ctx.events,
      metrics: new GcMetrics(ctx.metrics.registry),
      log: ctx.log,
    });
    const gc = new GcService({ collector, domains, roots, intervalMs: c.intervalMs, canCollect: !!holder, log: ctx.log });
    gc.start();
    ctx.log.info({ domains, storageRoots: roots.roots, intervalMs: c.intervalMs, graceMs: c.graceMs, collecting: !!holder }, 'gc started');
    return {
      services: [service(pb.GcServiceDefinition, gc.handlers())],
      stop: async () => {
        await gc.stop();
        await workers?.stop();
        await holder?.close();
      },
    };
  },
});
