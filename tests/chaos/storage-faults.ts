import type { PlannedFault } from './faults';
import { descendants, type ChaosMesh } from './mesh';
import { IoThrottle, type IoLimits, type LoopFs } from './storage';

/** A slow storage path: a trickle of direct I/O (the copies alone are throttled to 4 MiB/s). */
const SLOW: IoLimits = { readBps: 512 * 1024, writeBps: 512 * 1024, readIops: 20, writeIops: 20 };
/** Unwritable: 1 byte/s, so a 512-byte sanlock write takes minutes and its renewal fails (io_timeout 1 s). */
const UNWRITABLE: IoLimits = { writeBps: 1 };

export interface AppliedFault {
  target: string;
  detail: string;
  /** Processes it was applied to (the harness's own pid for a fill). */
  pids: number[];
  hit: boolean;
}

/**
 * The storage faults of a run (faults.ts STORAGE_FAULT_KINDS) on the storage of its mesh: the
 * loop-mounted domain's file system, and one throttle group per host and kind. Every process it
 * moves is one of the mesh this run started (by pid); all are moved back at the settle.
 */
export class StorageFaults {
  private readonly throttles = new Map<string, IoThrottle>();
  private filled = false;

  constructor(
    private readonly mesh: ChaosMesh,
    /** The small domain's file system (ENOSPC), if the run has one. */
    private readonly loop: LoopFs | undefined,
    /** The disks ("major:minor") holding the domains: the storage directory's and the loop device. */
    private readonly disks: string[],
    private readonly name: string,
  ) {}

  private throttle(key: string): IoThrottle {
    let t = this.throttles.get(key);
    if (!t) {
      t = IoThrottle.create(`${this.name}-${key}`);
      this.throttles.set(key, t);
    }
    return t;
  }

  private key(f: PlannedFault): string {
    return `h${f.host}-${f.kind}`;
  }

  async apply(f: PlannedFault): Promise<AppliedFault> {
    const host = this.mesh.mesh.hosts[f.host - 1]!;
    if (f.kind === 'fill-domain') {
      if (!this.loop) return { target: 'small domain', detail: 'no loop-mounted domain in this run', pids: [], hit: false };
      if (this.filled) return { target: this.loop.mountPoint, detail: 'already filled', pids: [], hit: false };
      const before = this.loop.free();
      this.filled = true;
      const file = await this.loop.fill(0);
      return { target: this.loop.mountPoint, detail: `${file}: ${before} bytes free before, ${this.loop.free()} after`, pids: [process.pid], hit: true };
    }
    const t = this.throttle(this.key(f));
    if (t.members().length) return { target: `${host.name} ${f.kind}`, detail: 'already throttled', pids: [], hit: false };
    let pids: number[];
    if (f.kind === 'slow-storage') {
      const mover = host.services['data-mover']?.process.pid ?? -1;
      const roots = [mover, host.services['metadata-tx']?.process.pid ?? -1, host.services.gc?.process.pid ?? -1].filter((p) => p > 0);
      pids = [...roots, ...descendants([mover]).map((p) => p.pid)];
      t.limit(this.disks, SLOW);
    } else {
      pids = host.sanlock.running() ? [host.sanlock.pid] : [];
      t.limit(this.disks, UNWRITABLE);
    }
    const moved = t.add(pids);
    if (!moved.length) t.releaseAll(this.disks);
    return {
      target: `${host.name}/${f.kind === 'slow-storage' ? 'data path' : 'sanlock'}`,
      detail: `${moved.length} processes throttled (${JSON.stringify(f.kind === 'slow-storage' ? SLOW : UNWRITABLE)}) on ${this.disks.join(', ')} for ${f.durationMs} ms`,
      pids: moved,
      hit: moved.length > 0,
    };
  }

  undo(f: PlannedFault): void {
    if (f.kind === 'fill-domain') {
      this.loop?.unfill();
      this.filled = false;
    } else this.throttles.get(this.key(f))?.releaseAll(this.disks);
  }

  /** The settle: space back, every throttled process moved back out. */
  undoAll(): void {
    this.loop?.unfill();
    this.filled = false;
    for (const t of this.throttles.values()) t.releaseAll(this.disks);
  }

  async destroy(): Promise<void> {
    this.loop?.unfill();
    for (const t of this.throttles.values()) t.destroy(this.disks);
    this.throttles.clear();
    await this.loop?.destroy();
  }
}
