import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { LockspaceStateName } from './lease-manager';

const LOCKSPACE_STATES: LockspaceStateName[] = ['NOT_JOINED', 'JOINING', 'JOINED', 'LEAVING', 'LOST', 'FAILED'];

/** The lease-manager's Prometheus metrics. */
export class LeaseMetrics {
  readonly acquireSeconds: Histogram<'mode' | 'result'>;
  readonly acquireFailures: Counter<'mode' | 'reason'>;
  readonly contention: Counter<'lockspace'>;
  readonly leasesHeld: Gauge<'lockspace' | 'mode'>;
  readonly leasesLost: Counter<'lockspace'>;
  readonly lockspaceState: Gauge<'lockspace' | 'state'>;

  constructor(registry: Registry) {
    const registers = [registry];
    this.acquireSeconds = new Histogram({
      name: 'sdmesh_lease_acquire_seconds',
      help: 'Time to acquire a lease through sanlock (including waiting), by mode and result.',
      labelNames: ['mode', 'result'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30],
      registers,
    });
    this.acquireFailures = new Counter({
      name: 'sdmesh_lease_acquire_failures_total',
      help: 'Lease acquisitions that failed, by reason (LEASE_HELD, LOCKSPACE_NOT_JOINED, ...).',
      labelNames: ['mode', 'reason'],
      registers,
    });
    this.contention = new Counter({
      name: 'sdmesh_lease_contention_total',
      help: 'Acquire attempts refused because another holder had the lease.',
      labelNames: ['lockspace'],
      registers,
    });
    this.leasesHeld = new Gauge({
      name: 'sdmesh_leases_held',
      help: 'Leases held on this host, by lockspace and mode.',
      labelNames: ['lockspace', 'mode'],
      registers,
    });
    this.leasesLost = new Counter({
      name: 'sdmesh_leases_lost_total',
      help: 'Leases lost because this host lost the lockspace or its sanlock daemon.',
      labelNames: ['lockspace'],
      registers,
    });
    this.lockspaceState = new Gauge({
      name: 'sdmesh_lockspace_state',
      help: 'State of each lockspace on this host: 1 for the current state, 0 for the others.',
      labelNames: ['lockspace', 'state'],
      registers,
    });
  }

  acquired(mode: string, seconds: number): void {
    this.acquireSeconds.observe({ mode, result: 'ok' }, seconds);
  }

  acquireFailed(mode: string, reason: string, seconds: number): void {
    this.acquireSeconds.observe({ mode, result: 'failed' }, seconds);
    this.acquireFailures.inc({ mode, reason });
  }

  contended(lockspace: string): void {
    this.contention.inc({ lockspace });
  }

  lost(lockspace: string): void {
    this.leasesLost.inc({ lockspace });
  }

  setHeld(leases: { lockspace: string; mode: string }[]): void {
    this.leasesHeld.reset();
    const counts = new Map<string, { lockspace: string; mode: string; n: number }>();
    for (const l of leases) {
      const k = `${l.lockspace}\0${l.mode}`;
      const c = counts.get(k) ?? { ...l, n: 0 };
      c.n++;
      counts.set(k, c);
    }
    for (const c of counts.values()) this.leasesHeld.set({ lockspace: c.lockspace, mode: c.mode }, c.n);
  }

  setLockspaceState(lockspace: string, state: LockspaceStateName): void {
    for (const s of LOCKSPACE_STATES) this.lockspaceState.set({ lockspace, state: s }, s === state ? 1 : 0);
  }
}
