/**
 * Fault injection for crash tests: a service declares its named fault points (the steps
 * after which a crash leaves storage in a distinct state); with SDMESH_FAULT_POINT=<name>
 * (config `faultPoint`, off in production) the process SIGKILLs itself when it gets there.
 */
export class FaultInjector<P extends string> {
  /**
   * @param points every fault point of the service
   * @param armed the point to die at ('' = none); an unknown name is refused at startup
   */
  constructor(
    readonly points: readonly P[],
    readonly armed: string = '',
    private readonly die: (point: P) => void = () => process.kill(process.pid, 'SIGKILL'),
  ) {
    if (armed && !(points as readonly string[]).includes(armed)) {
      throw new Error(`unknown fault point "${armed}"; known: ${points.join(', ')}`);
    }
  }

  hit(point: P): void {
    if (point === this.armed) this.die(point);
  }
}
