// The lease workers load this module: the slim entry of @sdmesh/common (no server, NATS or metrics).
import type { DomainRef } from '@sdmesh/common';
import { isLeaseHeldByAnother, type DomainLeases } from '@sdmesh/common/worker';

/** sanlock takes at most this many resources in one acquire. */
export const MAX_LEASES_PER_ACQUIRE = 8;
/** How long a partial group waits for more requests while other groups are out. */
const FILL_MS = 3;

/** A volume whose lease a group holds. */
export interface GroupedVolume {
  volumeId: string;
  slot: number;
}

/**
 * Holds the exclusive leases of these volumes (1..8, one domain), all or none and without waiting,
 * while body runs; releases them all when it settles. Held elsewhere → ABORTED (nothing taken).
 */
export type HoldVolumeGroup = (domain: DomainRef, volumes: readonly GroupedVolume[], operationId: string, body: () => Promise<void>) => Promise<void>;

/** A HoldVolumeGroup through this process's leases: one lease by AcquireLease, several by one AcquireLeases (one sanlock acquire). */
export function holdVolumesWith(leases: DomainLeases): HoldVolumeGroup {
  return (domain, volumes, operationId, body) => {
    const [one] = volumes;
    return volumes.length === 1
      ? leases.withVolumeLease(domain, one!.volumeId, one!.slot, 'exclusive', operationId, body, { wait: false })
      : leases.withVolumeLeases(
          volumes.map((v) => ({ domain, volumeId: v.volumeId, slot: v.slot, mode: 'exclusive' as const })),
          operationId,
          body,
          { wait: false },
        );
  };
}

interface Wanted extends GroupedVolume {
  domain: DomainRef;
  operationId: string;
  /** Asked alone: its group of several was refused (one of them is held), so each is tried by itself. */
  alone: boolean;
  held: () => void;
  refused: (err: unknown) => void;
  /** Settles when the item's work under the lease has ended. */
  workDone: Promise<void>;
  released: (err?: unknown) => void;
}

/**
 * The GC's volume leases, taken several per sanlock command: the items removed at once each ask
 * for their volume's lease, and the requests waiting at that moment (up to 8, of one domain and
 * one pass) are acquired together, all or none (the lease-manager's AcquireLeases). A group is
 * released when every item in it has ended its work, so each record is still removed while its
 * volume lease is held, and each item ends only after its lease is released (before the batch
 * releases the domain lease, as with one lease per call). If one lease of a group is held (a
 * job still using that deleted volume), nothing was taken: each of the group is then asked for
 * alone, so only the held one is skipped. At most `concurrency` groups are held or asked for
 * at once (one per lease worker process: sanlock runs one command per process at a time). While
 * other groups are out, fewer than 8 waiting requests wait FILL_MS for more (bench/gc-collect.ts:
 * 5.5 → 6.8 leases per acquire, 14.0–14.2 → 13.2–13.5 s).
 */
export class VolumeLeaseGroups {
  private readonly wanted: Wanted[] = [];
  private active = 0;
  private scheduled = false;

  constructor(
    private readonly hold: HoldVolumeGroup,
    private readonly concurrency: number,
  ) {}

  async withVolumeLease<T>(domain: DomainRef, volumeId: string, slot: number, operationId: string, fn: () => Promise<T>): Promise<T> {
    let endWork!: () => void;
    const workDone = new Promise<void>((resolve) => (endWork = resolve));
    let releasedOk!: () => void;
    let releaseFailed!: (err: unknown) => void;
    const released = new Promise<void>((resolve, reject) => ((releasedOk = resolve), (releaseFailed = reject)));
    await new Promise<void>((held, refused) => {
      this.wanted.push({
        domain,
        volumeId,
        slot,
        operationId,
        alone: false,
        held,
        refused,
        workDone,
        released: (err) => (err === undefined ? releasedOk() : releaseFailed(err)),
      });
      this.schedule();
    });
    let outcome: { value: T } | { err: unknown };
    try {
      outcome = { value: await fn() };
    } catch (err) {
      outcome = { err };
    }
    endWork();
    try {
      await released;
    } catch (err) {
      // The work's own error says more than the release's.
      if (!('err' in outcome)) throw err;
    }
    if ('err' in outcome) throw outcome.err;
    return outcome.value;
  }

  /** Groups what is waiting after the current turn of the event loop, when items that start together have all asked. */
  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.pump();
    });
  }

  private fillTimer?: NodeJS.Timeout;

  private pump(): void {
    // While other groups are out, a partial group waits a moment for more requests: fuller acquires.
    if (this.active > 0 && this.wanted.length < MAX_LEASES_PER_ACQUIRE && this.active < this.concurrency) {
      this.fillTimer ??= setTimeout(() => {
        this.fillTimer = undefined;
        this.dispatch();
      }, FILL_MS);
      return;
    }
    this.dispatch();
  }

  private dispatch(): void {
    clearTimeout(this.fillTimer);
    this.fillTimer = undefined;
    while (this.active < this.concurrency && this.wanted.length) {
      const first = this.wanted.shift()!;
      const group = [first];
      for (let i = 0; !first.alone && i < this.wanted.length && group.length < MAX_LEASES_PER_ACQUIRE;) {
        const w = this.wanted[i]!;
        if (!w.alone && w.domain.id === first.domain.id && w.operationId === first.operationId) group.push(...this.wanted.splice(i, 1));
        else i++;
      }
      this.active++;
      void this.run(group).finally(() => {
        this.active--;
        if (this.wanted.length) this.schedule();
      });
    }
  }

  private async run(group: Wanted[]): Promise<void> {
    const [{ domain, operationId }] = group as [Wanted];
    let held = false;
    try {
      const volumes = group.map(({ volumeId, slot }) => ({ volumeId, slot }));
      await this.hold(domain, volumes, operationId, async () => {
        held = true;
        for (const w of group) w.held();
        await Promise.all(group.map((w) => w.workDone));
      });
      for (const w of group) w.released();
    } catch (err) {
      if (held) {
        for (const w of group) w.released(err);
      } else if (group.length > 1 && isLeaseHeldByAnother(err)) {
        // All or none: one of them is held. Each by itself, first in line, so only that one is skipped.
        this.wanted.unshift(...group.map((w) => ({ ...w, alone: true })));
      } else {
        for (const w of group) w.refused(err);
      }
    }
  }
}
