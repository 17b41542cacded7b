/**
 * The client side of the lease frame protocol (lease-frames.ts), for LeaseHolder: the same calls,
 * requests, answers and errors as the lease-manager's gRPC client, over one unix socket connection
 * of length-prefixed frames. Errors are the SdmeshErrors a gRPC call gives: the lease-manager's own
 * (code, reason, message), UNAVAILABLE when the connection fails or closes during a call,
 * DEADLINE_EXCEEDED at the deadline, CANCELLED when the signal aborts (the restart ride-through,
 * lease-manager-restart.ts, works on either transport).
 */
import net from 'node:net';
import { cancelled, deadlineExceeded, internal, resourceExhausted, SdmeshError, unavailable } from './errors';
import { deadlineOf, type CallOptions, type ServiceClient } from './grpc-client';
import * as pb from './lease-proto';
import {
  encodeFrame,
  decodeErrorBody,
  FrameError,
  FrameKind,
  FrameReader,
  frameMethodId,
  MAX_REPLY_BODY,
  MAX_TIMER_MS,
  type Frame,
  type FrameMethod,
} from './lease-frames';

type LeaseDefinition = typeof pb.LeaseManagerServiceDefinition;
/** The calls a LeaseHolder makes, with the gRPC client's signatures. */
export type LeaseCalls = Pick<ServiceClient<LeaseDefinition>, 'acquireLease' | 'acquireLeases' | 'releaseLease' | 'joinLockspace' | 'getLockspace'>;
const CALLS = ['acquireLease', 'acquireLeases', 'releaseLease', 'joinLockspace', 'getLockspace'] as const satisfies readonly (keyof LeaseCalls)[];

interface Pending {
  settle(frame: Frame | SdmeshError): void;
}

interface Connection {
  socket: net.Socket;
  pending: Map<number, Pending>;
}

/** Largest call id; ids count up from 1 and wrap (4 billion calls apart: none of them still in flight). */
const MAX_CALL_ID = 0xffffffff;
/** After the frame socket refused a connection, calls go to the fallback this long before it is tried again (not a failed connect per call). */
const NOT_SERVED_RETRY_MS = 2000;

export class LeaseFramesClient {
  private conn?: Connection;
  private connecting?: Promise<Connection | undefined>;
  private nextId = 1;
  private closed = false;
  /** Until then the frame socket is taken as not served (a connect to it failed). */
  private notServedUntil = 0;

  /**
   * @param socketPath the lease-manager's frame socket
   * @param fallback where a call goes when nobody serves that socket (a lease-manager that serves
   *   gRPC only, or none at all: gRPC then answers UNAVAILABLE, as before); without one, such a
   *   call fails UNAVAILABLE
   */
  constructor(
    readonly socketPath: string,
    private readonly fallback?: LeaseCalls,
  ) {}

  /** The calls, each on the frame socket when it is served, else on `fallback`. */
  calls(): LeaseCalls {
    const out: Record<string, unknown> = {};
    for (const key of CALLS) {
      const m = pb.LeaseManagerServiceDefinition.methods[key];
      const method = `${pb.LeaseManagerServiceDefinition.fullName}/${m.name}` as FrameMethod;
      const codec = m.requestType as unknown as { encode(v: unknown): { finish(): Uint8Array }; fromPartial(v: unknown): unknown };
      const encode = (request: unknown) => codec.encode(codec.fromPartial(request)).finish();
      out[key] = async (request: unknown, opts: CallOptions = {}) => {
        const conn = this.fallback && Date.now() < this.notServedUntil ? undefined : await this.connection();
        if (!conn) {
          if (this.fallback) return (this.fallback[key] as (r: unknown, o: CallOptions) => Promise<unknown>)(request, opts);
          throw unavailable(
            `the lease-manager's frame socket ${this.socketPath} does not accept connections (the lease-manager is not running, or serves gRPC only)`,
          );
        }
        const reply = await this.call(conn, method, encode(request), opts);
        try {
          return m.responseType.decode(reply.body);
        } catch (err) {
          throw internal(`the lease-manager's answer to ${m.name} could not be decoded: ${String(err)}`);
        }
      };
    }
    return out as LeaseCalls;
  }

  /** Closes the connection; calls in flight end UNAVAILABLE, later ones go to the fallback. */
  close(): void {
    this.closed = true;
    this.conn?.socket.destroy();
  }

  /** The connection, made on first use and after a close; undefined when the socket is not served. */
  private connection(): Promise<Connection | undefined> {
    if (this.conn && !this.conn.socket.destroyed) return Promise.resolve(this.conn);
    if (this.closed) return Promise.resolve(undefined);
    this.connecting ??= new Promise<Connection | undefined>((resolve) => {
      const socket = net.connect(this.socketPath);
      const conn: Connection = { socket, pending: new Map() };
      const reader = new FrameReader(MAX_REPLY_BODY);
      socket.once('connect', () => {
        socket.unref(); // referenced only while calls wait (see call())
        this.conn = conn;
        resolve(conn);
      });
      // Before connect: not served (the fallback's turn for a while); after: 'close' follows.
      socket.on('error', () => {
        if (this.conn !== conn) this.notServedUntil = Date.now() + NOT_SERVED_RETRY_MS;
        resolve(undefined);
      });
      socket.on('close', () => {
        if (this.conn === conn) this.conn = undefined;
        const lost = unavailable('the connection to the lease-manager closed during the call');
        for (const p of [...conn.pending.values()]) p.settle(lost);
      });
      socket.on('data', (chunk: Buffer) => {
        try {
          for (const frame of reader.push(chunk)) {
            if (frame.kind !== FrameKind.REPLY && frame.kind !== FrameKind.ERROR)
              throw new FrameError(`the lease-manager sent a frame of kind ${FrameKind[frame.kind]}`);
            conn.pending.get(frame.callId)?.settle(frame);
          }
        } catch {
          socket.destroy(); // its calls end UNAVAILABLE
        }
      });
    }).finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private call(conn: Connection, method: FrameMethod, body: Uint8Array, opts: CallOptions): Promise<Frame> {
    return new Promise<Frame>((resolve, reject) => {
      if (opts.signal?.aborted) return reject(cancelled('call cancelled by the client'));
      if (conn.socket.destroyed) return reject(unavailable('the connection to the lease-manager closed before the call'));
      const at = deadlineOf(opts);
      const deadline = at === undefined ? undefined : typeof at === 'number' ? at : at.getTime();
      const left = deadline === undefined ? undefined : deadline - Date.now();
      if (left !== undefined && left <= 0) return reject(deadlineExceeded(`deadline exceeded before calling the lease-manager (${method})`));
      const callId = this.nextId;
      this.nextId = this.nextId >= MAX_CALL_ID ? 1 : this.nextId + 1;
      let frame: Buffer;
      try {
        frame = encodeFrame({
          callId,
          kind: FrameKind.REQUEST,
          arg: frameMethodId(method),
          deadlineMs: left === undefined ? 0 : Math.min(MAX_CALL_ID, Math.ceil(left)),
          body,
        });
      } catch (err) {
        return reject(resourceExhausted(`${method}: ${err instanceof Error ? err.message : String(err)}`));
      }
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => giveUp(cancelled('call cancelled by the client'));
      const settle = (outcome: Frame | SdmeshError) => {
        conn.pending.delete(callId);
        if (timer) clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        if (!conn.pending.size) conn.socket.unref();
        if (outcome instanceof SdmeshError) reject(outcome);
        else if (outcome.kind === FrameKind.REPLY) resolve(outcome);
        else {
          const e = decodeErrorBody(outcome.arg, outcome.body);
          reject(new SdmeshError(e.code, e.message, e.reason));
        }
      };
      /** The client stops waiting: the lease-manager is told (CANCEL), as a gRPC client resets its stream. */
      const giveUp = (why: SdmeshError) => {
        if (!conn.pending.has(callId)) return;
        if (!conn.socket.destroyed) conn.socket.write(encodeFrame({ callId, kind: FrameKind.CANCEL, arg: 0, deadlineMs: 0 }));
        settle(why);
      };
      conn.pending.set(callId, { settle });
      if (left !== undefined && left <= MAX_TIMER_MS)
        timer = setTimeout(() => giveUp(deadlineExceeded(`deadline exceeded waiting for the lease-manager (${method})`)), left);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      conn.socket.ref();
      conn.socket.write(frame);
    });
  }
}
