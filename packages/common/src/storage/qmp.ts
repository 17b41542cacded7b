import net from 'node:net';
import { internal, SdmeshError, unavailable } from '../errors';

/** A QMP error answer: its class (GenericError, DeviceNotFound ...) and qemu's message. */
export class QmpError extends Error {
  constructor(
    readonly errorClass: string,
    readonly desc: string,
    readonly command: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

/**
 * A client of a QEMU Machine Protocol monitor on a unix socket (qemu-storage-daemon's
 * `--monitor`): one JSON object per line, answers matched to commands by id, events ignored.
 */
export class QmpClient {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closedError?: Error;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    const fail = (err: Error) => {
      this.closedError ??= err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    socket.on('error', (err) => fail(unavailable(`QMP connection failed: ${err.message}`)));
    socket.on('close', () => fail(unavailable('QMP connection closed (the storage daemon is gone)')));
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, timeoutMs = 10_000): Promise<QmpClient> {
    const socket = net.createConnection(socketPath);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(unavailable(`QMP socket ${socketPath}: no connection after ${timeoutMs} ms`)), timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve();
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(unavailable(`QMP socket ${socketPath}: ${err.message}`));
      });
    });
    const client = new QmpClient(socket);
    await client.greeting(timeoutMs);
    await client.execute('qmp_capabilities');
    return client;
  }

  private greetingSeen?: () => void;

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(unavailable(`QMP: no greeting after ${timeoutMs} ms`)), timeoutMs);
      this.greetingSeen = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let nl = this.buffer.indexOf('\n'); nl >= 0; nl = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: { QMP?: unknown; id?: string; return?: unknown; error?: { class: string; desc: string } };
      try {
        msg = JSON.parse(line) as typeof msg;
      } catch {
        continue;
      }
      if (msg.QMP !== undefined) {
        this.greetingSeen?.();
        continue;
      }
      if (msg.id === undefined) continue; // an event
      const p = this.pending.get(msg.id);
      if (!p) continue;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new QmpError(msg.error.class, msg.error.desc, p.command));
      else p.resolve(msg.return);
    }
  }

  /** Runs one command; rejects with QmpError on an error answer, UNAVAILABLE when the daemon is gone. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = String(this.nextId++);
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n');
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** A QMP failure as the project's error (INTERNAL, qemu's message kept). */
export function qmpFailure(err: unknown, what: string): SdmeshError {
  if (err instanceof SdmeshError) return err;
  return internal(`${what}: ${err instanceof Error ? err.message : String(err)}`);
}
