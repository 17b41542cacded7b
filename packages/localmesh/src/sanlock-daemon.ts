import fs from 'node:fs';
import path from 'node:path';
import { startProcess, waitFor, type ManagedProcess } from './processes';

/**
 * glibc malloc settings for the sanlock daemon: it allocates (and zeroes) a 1 MiB buffer for
 * every paxos read of a lease area, and by default glibc hands such buffers back to the kernel
 * when freed, so each acquire page-faulted 1 MiB in again. Kept in the heap (freed buffers below
 * 32 MiB of free heap stay mapped), sanlock's CPU per volume lease acquire+release fell by more
 * than half (bench/README.md, GC). Allocation only: sanlock's I/O and leases are unchanged.
 * The image's entrypoint (deploy/docker/sdmesh-run) sets the same.
 */
export const SANLOCK_MALLOC_TUNABLES = 'glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432';

/**
 * One real sanlock daemon simulating one host. Several daemons on one machine, each with
 * its own SANLOCK_RUN_DIR and host id in the same lockspace file, behave as several hosts
 * on shared storage. Run unprivileged (no watchdog, no mlock): fine for tests and demos,
 * never for production (see docs/lease-binding.md).
 */
export class SanlockDaemon {
  private proc?: ManagedProcess;

  constructor(
    /** Unique host name (sanlock's `-e`, its host identity in the lockspace). */
    readonly hostName: string,
    readonly runDir: string,
  ) {}

  /** Environment every client of this daemon (CLI, libsanlock) must see. */
  get env(): Record<string, string> {
    return { SANLOCK_RUN_DIR: this.runDir, SANLOCK_PRIVILEGED: '0' };
  }

  get pid(): number {
    return this.proc?.pid ?? -1;
  }

  running(): boolean {
    return !!this.proc?.running();
  }

  async start(): Promise<this> {
    fs.mkdirSync(this.runDir, { recursive: true });
    const sock = path.join(this.runDir, 'sanlock.sock');
    fs.rmSync(sock, { force: true });
    this.proc = startProcess(
      `sanlock@${this.hostName}`,
      process.env.SDMESH_SANLOCK_BIN ?? 'sanlock',
      ['daemon', '-D', '-w', '0', '-l', '0', '-U', 'root', '-G', 'root', '-e', this.hostName],
      { env: { GLIBC_TUNABLES: SANLOCK_MALLOC_TUNABLES, ...process.env, ...this.env }, logFile: path.join(this.runDir, 'sanlock.log') },
    );
    const proc = this.proc;
    await waitFor(`sanlock daemon ${this.hostName} socket`, () => {
      if (!proc.running()) throw new Error(`sanlock daemon ${this.hostName} exited; see ${path.join(this.runDir, 'sanlock.log')}`);
      return fs.existsSync(sock) || undefined;
    });
    return this;
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await this.proc?.stop(signal, 5000);
  }
}
