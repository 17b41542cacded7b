/**
 * Fault points of the GC: steps after which a crash leaves an item half removed. With
 * SDMESH_FAULT_POINT=<name> (config `faultPoint`) the process SIGKILLs itself there, so tests
 * can prove a rerun finishes the job. (Same idea as services/metadata-tx/src/faults.ts; the
 * point names differ, so this is a small local copy rather than a shared module.)
 */
export const GC_FAULT_POINTS = [
  // after findGarbage, before anything is removed
  'gc.pass.after-list',
  // the domain metadata lease was just acquired for a batch
  'gc.batch.after-domain-lease',
  // an item's data files are gone, its record (the slot claim) not yet
  'gc.item.after-data',
  // an item's record is gone, the item's directory (if any) not yet
  'gc.item.after-record',
] as const;

export type GcFaultPoint = (typeof GC_FAULT_POINTS)[number];

export class GcFaultInjector {
  /** @param armed the fault point to die at ('' = none). */
  constructor(
    readonly armed: string = '',
    private readonly die: (point: GcFaultPoint) => void = () => process.kill(process.pid, 'SIGKILL'),
  ) {
    if (armed && !(GC_FAULT_POINTS as readonly string[]).includes(armed)) {
      throw new Error(`unknown fault point "${armed}"; known: ${GC_FAULT_POINTS.join(', ')}`);
    }
  }

  hit(point: GcFaultPoint): void {
    if (point === this.armed) this.die(point);
  }
}
