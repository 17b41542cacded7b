import { PER_HOST_SERVICES } from '@sdmesh/localmesh';
import { GC_FAULT_POINTS } from '../../services/gc/src/faults';
import { FAULT_POINTS as METADATA_TX_FAULT_POINTS } from '../../services/metadata-tx/src/faults';
import type { History } from './history';
import { descendants, signal, type ChaosMesh, type Supervised } from './mesh';
import { Rng } from './rng';
import type { StorageFaults } from './storage-faults';

/**
 * The kinds of fault. `sanlock-stall` stops a host's sanlock daemon for longer than its
 * lockspace renewal allows (8 × io_timeout): the host loses its lockspace as if its storage
 * became unwritable for it alone, and sanlock fences its lease holders when it runs again.
 */
export const FAULT_KINDS = [
  'kill-service',
  'stop-service',
  'kill-copy-worker',
  'kill-qemu-img',
  'stop-qemu-img',
  'kill-scheduler',
  'stop-scheduler',
  'kill-sanlock',
  'sanlock-stall',
  'kill-nats',
  'stop-nats',
  'fault-point',
] as const;

/**
 * Storage faults (`--storage-faults`, docs/chaos.md), planned only when the run has the storage
 * for them (a loop-mounted domain, a blkio/io cgroup): `fill-domain` fills the small domain's
 * file system (ENOSPC) with a file beside the domain; `slow-storage` throttles a host's
 * data-mover, its copy workers and qemu-img, metadata-tx and gc to a trickle of direct I/O;
 * `lockspace-unwritable` throttles a host's sanlock daemon's writes to 1 byte/s, past the
 * renewal limit: the host's lockspaces become unwritable for it alone (storage loss for one host).
 */
export const STORAGE_FAULT_KINDS = ['fill-domain', 'slow-storage', 'lockspace-unwritable'] as const;
export type FaultKind = (typeof FAULT_KINDS)[number] | (typeof STORAGE_FAULT_KINDS)[number];

const WEIGHTS: Record<(typeof FAULT_KINDS)[number], number> = {
  'kill-service': 22,
  'stop-service': 8,
  'kill-copy-worker': 14,
  'kill-qemu-img': 10,
  'stop-qemu-img': 5,
  'kill-scheduler': 10,
  'stop-scheduler': 4,
  'kill-sanlock': 4,
  'sanlock-stall': 2,
  'kill-nats': 4,
  'stop-nats': 3,
  'fault-point': 12,
};
const STORAGE_WEIGHTS: Record<(typeof STORAGE_FAULT_KINDS)[number], number> = {
  'fill-domain': 8,
  'slow-storage': 8,
  'lockspace-unwritable': 3,
};

/** One planned fault: when (ms after the start of the load), what, on which host/target, for how long. */
export interface PlannedFault {
  index: number;
  atMs: number;
  kind: FaultKind;
  /** 1-based host, for per-host targets. */
  host: number;
  /** The service for kill-service/stop-service, the scheduler replica (1 or 2), or the fault point. */
  target: string;
  /** How long a stopped process stays stopped, or how long until a killed one is started again. */
  durationMs: number;
}

/**
 * The whole fault plan from the seed alone: the same seed, fault count, duration and host count
 * give the same plan (what is injected, where, when), whatever the mesh does meanwhile.
 */
export function planFaults(seed: number, faults: number, durationMs: number, hosts: number, opts: { storage?: boolean } = {}): PlannedFault[] {
  const rng = new Rng(seed);
  // Without storage faults the table is the one every earlier run used: a seed's plan stays what it was.
  const weights: Partial<Record<FaultKind, number>> = opts.storage ? { ...WEIGHTS, ...STORAGE_WEIGHTS } : WEIGHTS;
  const gap = durationMs / Math.max(faults, 1);
  const plan: PlannedFault[] = [];
  for (let index = 0; index < faults; index++) {
    const kind = rng.weighted(weights);
    const host = rng.int(1, hosts);
    let target = '';
    let durationMs = rng.int(500, 5000);
    if (kind === 'kill-service' || kind === 'stop-service') target = rng.pick(PER_HOST_SERVICES);
    if (kind === 'kill-scheduler' || kind === 'stop-scheduler') target = `scheduler-${rng.int(1, 2)}`;
    if (kind === 'sanlock-stall' || kind === 'lockspace-unwritable') durationMs = rng.int(10_000, 16_000);
    if (kind === 'fill-domain' || kind === 'slow-storage') durationMs = rng.int(5000, 20_000);
    if (kind === 'fault-point') {
      const svc = rng.next() < 0.7 ? 'metadata-tx' : 'gc';
      target = `${svc}:${rng.pick<string>(svc === 'gc' ? GC_FAULT_POINTS : METADATA_TX_FAULT_POINTS)}`;
      durationMs = rng.int(5000, 20_000);
    }
    plan.push({ index, atMs: Math.round(index * gap + rng.next() * gap * 0.8), kind, host, target, durationMs });
  }
  return plan;
}

/** Runs a plan against the mesh, recording each fault (or why it found nothing to hit) in the history. */
export class FaultInjector {
  private readonly stopped = new Set<number>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** Services running with a fault point armed, until disarmed. */
  private readonly armed = new Set<Supervised>();
  readonly injected: Record<string, number> = {};
  readonly missed: Record<string, number> = {};

  constructor(
    private readonly mesh: ChaosMesh,
    private readonly history: History,
    private readonly storage?: StorageFaults,
  ) {}

  async run(plan: PlannedFault[], startedAt: number, signalStop: AbortSignal): Promise<void> {
    for (const f of plan) {
      const wait = startedAt + f.atMs - Date.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      if (signalStop.aborted) return;
      await this.inject(f);
    }
  }

  private target(name: string): Supervised {
    return this.mesh.targets.find((t) => t.name === name)!;
  }

  /** The NATS node the planned host number points at (one node: always it). */
  private natsNode(n: number): Supervised {
    const nodes = this.mesh.targets.filter((t) => t.kind === 'nats');
    return nodes[(n - 1) % nodes.length]!;
  }

  private record(f: PlannedFault, target: string, pid: number | undefined, detail?: string, hit = pid !== undefined && pid > 0): void {
    (hit ? this.injected : this.missed)[f.kind] = ((hit ? this.injected : this.missed)[f.kind] ?? 0) + 1;
    this.history.add({ kind: 'fault', fault: hit ? f.kind : `${f.kind} (no target)`, target, pid, detail, index: f.index });
  }

  private later(ms: number, fn: () => void): void {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
  }

  /** SIGKILL of a supervised process; the supervisor's restart follows after the planned delay. */
  private kill(f: PlannedFault, t: Supervised): void {
    const pid = t.pid();
    if (t.restarting || !t.running()) return this.record(f, t.name, undefined, 'already down');
    t.downUntil = Date.now() + f.durationMs;
    signal(pid, 'SIGCONT');
    signal(pid, 'SIGKILL');
    this.record(f, t.name, pid, `restart after ${f.durationMs} ms`);
  }

  /** SIGSTOP, then SIGCONT after the planned time. */
  private pause(f: PlannedFault, name: string, pid: number): void {
    if (pid <= 0 || this.stopped.has(pid) || !signal(pid, 'SIGSTOP')) return this.record(f, name, undefined, 'not running');
    this.stopped.add(pid);
    this.record(f, name, pid, `SIGCONT after ${f.durationMs} ms`);
    this.later(f.durationMs, () => {
      signal(pid, 'SIGCONT');
      this.stopped.delete(pid);
    });
  }

  /**
   * Job processes under a data-mover: the planned host's, else any host's (the fault lands where
   * the work is); copy workers running a job (with a qemu child) before idle pre-started ones.
   */
  private jobProcesses(host: number, worker: boolean) {
    const dataMover = this.mesh.mesh.hosts[host - 1]!.services['data-mover'];
    const roots = [dataMover?.process.pid ?? -1, ...this.mesh.mesh.hosts.map((h) => h.services['data-mover']?.process.pid ?? -1)];
    for (const root of roots) {
      const all = descendants([root]);
      const qemu = all.filter((p) => p.comm.startsWith('qemu-'));
      if (!worker && qemu.length) return qemu;
      const workers = all.filter((p) => p.cmdline.includes('copy-worker'));
      const busy = workers.filter((w) => all.some((p) => p.ppid === w.pid));
      if (worker && (busy.length || workers.length)) return busy.length ? busy : workers;
    }
    return [];
  }

  /** A storage fault: applied now, undone after the planned time (or at the settle). */
  private async storageFault(f: PlannedFault): Promise<void> {
    const s = this.storage;
    if (!s) return this.record(f, 'storage', undefined, 'no storage faults in this run');
    const applied = await s
      .apply(f)
      .catch((err: unknown) => ({ target: 'storage', detail: `failed: ${String(err).slice(0, 200)}`, pids: [] as number[], hit: false }));
    this.record(f, applied.target, applied.pids[0], applied.detail, applied.hit);
    if (applied.hit) this.later(f.durationMs, () => s.undo(f));
  }

  async inject(f: PlannedFault): Promise<void> {
    const host = this.mesh.mesh.hosts[f.host - 1]!;
    switch (f.kind) {
      case 'fill-domain':
      case 'slow-storage':
      case 'lockspace-unwritable':
        return this.storageFault(f);
      case 'kill-service':
        return this.kill(f, this.target(`${host.name}/${f.target}`));
      case 'stop-service': {
        const t = this.target(`${host.name}/${f.target}`);
        return this.pause(f, t.name, t.running() ? t.pid() : -1);
      }
      case 'kill-scheduler':
        return this.kill(f, this.target(f.target));
      case 'stop-scheduler': {
        const t = this.target(f.target);
        return this.pause(f, t.name, t.running() ? t.pid() : -1);
      }
      case 'kill-sanlock':
        return this.kill(f, this.target(`${host.name}/sanlock`));
      case 'sanlock-stall': {
        const t = this.target(`${host.name}/sanlock`);
        return this.pause(f, t.name, t.running() ? t.pid() : -1);
      }
      case 'kill-nats':
        return this.kill(f, this.natsNode(f.host));
      case 'stop-nats': {
        const t = this.natsNode(f.host);
        return this.pause(f, t.name, t.running() ? t.pid() : -1);
      }
      case 'kill-copy-worker':
      case 'kill-qemu-img':
      case 'stop-qemu-img': {
        const worker = f.kind === 'kill-copy-worker';
        const found = this.jobProcesses(f.host, worker);
        const victim = found[Math.floor(found.length / 2)];
        if (!victim) return this.record(f, worker ? 'copy-worker' : 'qemu-img', undefined, 'none running');
        const name = `${worker ? 'copy-worker' : victim.comm}@pid${victim.pid}`;
        if (f.kind === 'stop-qemu-img') return this.pause(f, name, victim.pid);
        signal(victim.pid, 'SIGCONT');
        signal(victim.pid, 'SIGKILL');
        return this.record(f, name, victim.pid, victim.cmdline.slice(0, 200));
      }
      case 'fault-point': {
        const [svc, point] = f.target.split(':') as [string, string];
        const t = this.target(`${host.name}/${svc}`);
        if (t.restarting || !t.running()) return this.record(f, t.name, undefined, 'already down');
        // Restarted armed: it SIGKILLs itself when it reaches the point; disarmed (restarted plain) after the planned time.
        const pid = t.pid();
        signal(pid, 'SIGKILL');
        this.record(f, t.name, pid, `restarted armed at ${point} for ${f.durationMs} ms`);
        this.mesh.restartLater(t, 200, { SDMESH_FAULT_POINT: point });
        this.armed.add(t);
        this.later(f.durationMs, () => this.disarm(t));
        return;
      }
    }
  }

  /** Restarts a service plain, unless it already died at its fault point (the supervisor restarts it plain then). */
  private disarm(t: Supervised): void {
    this.armed.delete(t);
    if (t.restarting || !t.running()) return;
    signal(t.pid(), 'SIGKILL');
    this.mesh.restartLater(t, 200);
  }

  /** Ends every pause now and drops pending timers (the settle phase). */
  settle(): void {
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    this.storage?.undoAll();
    for (const t of this.armed) this.disarm(t);
    for (const pid of this.stopped) signal(pid, 'SIGCONT');
    this.stopped.clear();
    for (const t of this.mesh.targets) {
      t.downUntil = 0;
      if (t.running()) signal(t.pid(), 'SIGCONT');
    }
  }
}
