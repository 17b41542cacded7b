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
] as const;

export type FaultPoint = (typeof FAULT_POINTS)[number];

export class FaultInjector {
  /** @param armed the fault point to die at ('' = none). */
  constructor(
    readonly armed: string = '',
    private readonly die: (point: FaultPoint) => void = () => process.kill(process.pid, 'SIGKILL'),
  ) {
    if (armed && !(FAULT_POINTS as readonly string[]).includes(armed)) {
      throw new Error(`unknown fault point "${armed}"; known: ${FAULT_POINTS.join(', ')}`);
    }
  }

  hit(point: FaultPoint): void {
    if (point === this.armed) this.die(point);
  }
}
