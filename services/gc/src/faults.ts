import { FaultInjector } from '@sdmesh/common';

/**
 * Fault points of the GC: steps after which a crash leaves an item half removed. With
 * SDMESH_FAULT_POINT=<name> (config `faultPoint`) the process SIGKILLs itself there, so tests
 * can prove a rerun finishes the job.
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

/** The GC's fault points over the shared injector. */
export class GcFaultInjector extends FaultInjector<GcFaultPoint> {
  constructor(armed = '', die?: (point: GcFaultPoint) => void) {
    super(GC_FAULT_POINTS, armed, die);
  }
}
