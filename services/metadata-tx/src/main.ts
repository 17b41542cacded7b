#!/usr/bin/env node
import fs from 'node:fs';
import {
  DomainLeases,
  LeaseHolder,
  MAX_HOST_ID,
  pb,
  resolveGroup,
  runService,
  service,
  setStorageGroup,
  storageRootsOption,
  StorageRoots,
} from '@sdmesh/common';
import { FaultInjector, FaultPause, type FaultPoint } from './faults';
import type { HoldRecord } from './group-commit';
import { metadataTxHandlers } from './handlers';
import { InProcessDomainLeaseProvider, type DomainLeaseProvider } from './leases';
import { MetadataTransactions, SpmLeases } from './transactions';

void runService({
  name: 'metadata-tx',
  summary: 'metadata-tx: short metadata operations as storage transactions under the domain metadata lease.',
  options: {
    hostId: {
      type: 'int',
      description: "This host's sanlock host id (1..250; 0 = unknown), recorded in transaction ids.",
      default: 0,
      min: 0,
      max: MAX_HOST_ID,
    },
    leaseManagerAddress: { type: 'string', description: "Address of this host's lease-manager (empty = single-process mode, for tests only).", default: '' },
    faultPoint: { type: 'string', description: 'Testing only: SIGKILL this process at the named fault point.', default: '' },
    faultPauseFile: {
      type: 'string',
      description: 'Testing only, with --fault-point: do not die there; the first transaction there writes <file>.paused and waits until <file>.go exists.',
      default: '',
    },
    leaseHoldLog: {
      type: 'string',
      description:
        'Testing and benches only: append each hold of a domain metadata lease by this process (host, domain, acquired and released ms, transactions) to this file as a JSON line.',
      default: '',
    },
    storageGroup: {
      type: 'string',
      description: "Group (name or gid) of the files and directories it creates in domains, e.g. the hypervisor's kvm (empty: the process's).",
      default: '',
    },
    storageRoots: storageRootsOption,
  },
  async start(ctx) {
    const { hostId, leaseManagerAddress, faultPoint } = ctx.config;
    const roots = new StorageRoots(ctx.config.storageRoots, `metadata-tx on ${ctx.hostName}`);
    if (!roots.configured) ctx.log.warn('no --storage-roots (SDMESH_STORAGE_ROOTS): every request on a storage domain is refused');
    if (ctx.config.storageGroup) setStorageGroup(await resolveGroup(ctx.config.storageGroup));
    let leases: DomainLeaseProvider;
    let holder: LeaseHolder | undefined;
    let domainLeases: DomainLeases | undefined;
    if (leaseManagerAddress) {
      // This process holds the domain leases (sanlock fences it if the host loses a lockspace).
      holder = await LeaseHolder.register({ leaseManagerAddress, log: ctx.log });
      leases = domainLeases = new DomainLeases(holder);
    } else {
      ctx.log.warn(
        'SINGLE-PROCESS MODE: no lease-manager address, so the domain metadata lease is an in-process mutex. ' +
          'This is unsafe if any other host or process writes the same storage domains.',
      );
      leases = new InProcessDomainLeaseProvider();
    }
    const { faultPauseFile } = ctx.config;
    if (faultPoint && faultPauseFile) ctx.log.warn({ faultPoint, faultPauseFile }, 'fault pause armed: the first transaction there waits for the test');
    else if (faultPoint) ctx.log.warn({ faultPoint }, 'fault injection armed: this process will SIGKILL itself at that point');
    const tx = new MetadataTransactions({
      leases,
      registry: ctx.metrics.registry,
      events: ctx.events,
      log: ctx.log,
      hostId,
      faults: new FaultInjector(faultPauseFile ? '' : faultPoint),
      faultPause: faultPoint && faultPauseFile ? new FaultPause(faultPoint as FaultPoint, faultPauseFile) : undefined,
      groupCommit: ctx.config.leaseHoldLog ? { onHold: holdLogger(ctx.config.leaseHoldLog, ctx.hostName) } : undefined,
    });
    return {
      services: [service(pb.MetadataTxServiceDefinition, metadataTxHandlers(tx, roots, new SpmLeases(domainLeases)))],
      stop: async () => holder?.close(),
    };
  },
});

/**
 * Appends each lease hold as a JSON line. Its times are taken inside the hold (after the
 * acquire returned, before the release is asked for), so holds of different hosts that overlap
 * in this file overlapped in sanlock too: benches and tests check there are none.
 */
function holdLogger(file: string, host: string): (hold: HoldRecord) => void {
  return (hold) => fs.appendFileSync(file, JSON.stringify({ host, pid: process.pid, ...hold }) + '\n');
}
