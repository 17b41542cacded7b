import fs from 'node:fs';
import path from 'node:path';
import { freePort, startProcess, waitForPort, type ManagedProcess } from './processes';

/** A real nats-server (Debian's) with JetStream, on a free loopback port. */
export class NatsServer {
  private proc?: ManagedProcess;
  port = 0;

  constructor(private readonly dir: string) {}

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    if (!this.port) this.port = await freePort();
    const storeDir = path.join(this.dir, 'jetstream');
    fs.mkdirSync(storeDir, { recursive: true });
    this.proc = startProcess('nats-server', process.env.SDMESH_NATS_SERVER_BIN ?? 'nats-server', ['-a', '127.0.0.1', '-p', String(this.port), '-js', '-sd', storeDir], {
      logFile: path.join(this.dir, 'nats-server.log'),
    });
    await Promise.race([
      waitForPort(this.port),
      this.proc.exited.then((code) => {
        throw new Error(`nats-server exited (${code}); see ${path.join(this.dir, 'nats-server.log')}`);
      }),
    ]);
    return this;
  }

  get pid(): number {
    return this.proc?.pid ?? -1;
  }

  running(): boolean {
    return !!this.proc?.running();
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await this.proc?.stop(signal);
  }

  /** Stops and starts again on the same port with the same store. */
  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }
}
