import fs from 'node:fs/promises';
import { FaultInjector as CommonFaultInjector } from '@sdmesh/common';

/**
 * Fault points: every step of a storage transaction after which a crash leaves the domain
 * in a distinct state. With SDMESH_FAULT_POINT=<name> (config `faultPoint`) the process
 * SIGKILLs itself there, so tests can prove each state is safe and recoverable.
 */
export const FAULT_POINTS = [
  // formatDomain
  'format.after-dirs',
  'format.after-leases',
  'format.before-commit',
  'format.after-metadata',
  // createVolume (new image and snapshot)
  'create.after-marker',
  'create.after-meta',
  'create.after-lease',
  'create.after-data',
  'create.before-commit',
  'create.after-commit',
  // deleteVolume / deleteImage
  'delete.before-rename',
  'delete.after-rename',
  // updateVolume
  'update.before-write',
  'update.before-rename',
  'update.after-write',
  // finalizeMerge (then delete.* for the merged-away volume)
  'merge.after-top-illegal',
  'merge.after-rebase',
  'merge.after-reparent',
  // group commit: before the second and later transactions of one domain lease hold
  'group.next-transaction',
] as const;

export type FaultPoint = (typeof FAULT_POINTS)[number];

/** The metadata-tx fault points over the shared injector. */
export class FaultInjector extends CommonFaultInjector<FaultPoint> {
  constructor(armed = '', die?: (point: FaultPoint) => void) {
    super(FAULT_POINTS, armed, die);
  }
}

/**
 * Testing only (config `faultPauseFile` with `faultPoint`): instead of dying there, the first
 * transaction that reaches the point writes `<file>.paused` and waits, still serving everything
 * else, until `<file>.go` exists — so an integration test can hold a create past its last cancel
 * check (create.before-commit) while it cancels the operation and its rollback runs.
 */
export class FaultPause {
  private reached = false;

  constructor(
    readonly point: FaultPoint,
    readonly file: string,
  ) {
    if (!(FAULT_POINTS as readonly string[]).includes(point)) throw new Error(`unknown fault point "${point}"; known: ${FAULT_POINTS.join(', ')}`);
  }

  async at(point: FaultPoint): Promise<void> {
    if (point !== this.point || this.reached) return;
    this.reached = true;
    await fs.writeFile(`${this.file}.paused`, point);
    while (
      !(await fs.access(`${this.file}.go`).then(
        () => true,
        () => false,
      ))
    )
      await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
