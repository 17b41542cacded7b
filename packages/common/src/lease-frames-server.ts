/**
 * The server side of the lease frame protocol (lease-frames.ts): a unix socket beside the
 * lease-manager's gRPC socket. Each connection's caller is the process the kernel names
 * (SO_PEERCRED, as on the gRPC socket); every call goes through GrpcServer's own path for the
 * method (authorization, deadline, cancellation, handler, audit, metrics), so the two transports
 * differ in framing only. A connection that breaks the protocol is logged and closed; nothing a
 * peer sends throws out of here.
 */
import type net from 'node:net';
import type * as grpc from '@grpc/grpc-js';
import { Metadata, status } from '@grpc/grpc-js';
import { SdmeshError } from './errors';
import { Reason } from './reasons';
import type { Identity } from './identity';
import type { Logger } from './logger';
import { listenUnixSocket, localPeerOf } from './local-socket';
import { decodeRequest } from './request-decode';
import {
  encodeErrorBody,
  encodeFrame,
  FrameError,
  FrameKind,
  FrameReader,
  frameMethodOf,
  MAX_CALLS_IN_FLIGHT,
  MAX_UNSENT_ANSWER_BYTES,
  type Frame,
} from './lease-frames';

/** One call as a server's shared call path sees it, whatever transport brought it. */
export interface IncomingCall {
  request: unknown;
  deadline?: Date;
  metadata: grpc.Metadata;
  peer: string;
  /** Undefined: not authenticated (refused by authorization). */
  identity: Identity | undefined;
  /** Registers what to do when the client cancels the call. */
  onCancel(cancel: () => void): void;
}

interface MessageCodec {
  encode(message: unknown): { finish(): Uint8Array };
  decode(input: Uint8Array): unknown;
  fromPartial(object: unknown): unknown;
}

/** A unary method as GrpcServer runs it, for either transport. */
export interface FramedMethod {
  fullMethod: string;
  call(incoming: IncomingCall): Promise<{ result: unknown } | { error: SdmeshError }>;
}

export interface ServedFrameMethod extends FramedMethod {
  definition: { requestType: MessageCodec; responseType: MessageCodec };
}

export class LeaseFramesServer {
  private server?: net.Server;
  private readonly connections = new Set<net.Socket>();
  /** Calls in flight on all connections, and who waits for them to end (idle()). */
  private calls = 0;
  private idleWaiters: (() => void)[] = [];

  constructor(
    private readonly socketPath: string,
    private readonly methods: ReadonlyMap<string, ServedFrameMethod>,
    private readonly log: Logger,
  ) {}

  async listen(): Promise<void> {
    this.server = await listenUnixSocket(this.socketPath, (socket) => this.serve(socket));
  }

  /** Resolves once no call is in flight (a shutdown's grace, as grpc-js's tryShutdown gives gRPC calls). */
  idle(): Promise<void> {
    return this.calls ? new Promise((resolve) => this.idleWaiters.push(resolve)) : Promise.resolve();
  }

  /** Stops accepting and closes every connection (their calls in flight are cancelled). */
  close(): void {
    this.server?.close();
    for (const s of this.connections) s.destroy();
  }

  private serve(socket: net.Socket): void {
    let identity: Identity;
    try {
      identity = { kind: 'local', ...localPeerOf(socket) };
    } catch (err) {
      this.log.warn({ err: String(err) }, 'lease frame connection refused: peer credentials unavailable');
      socket.destroy();
      return;
    }
    const peer = `local:${identity.pid}:${identity.uid}`;
    this.connections.add(socket);
    const reader = new FrameReader();
    /** Calls in flight on this connection: their cancel (a CANCEL frame, or the connection closing). */
    const inFlight = new Map<number, () => void>();
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.connections.delete(socket);
      for (const cancel of inFlight.values()) cancel();
      inFlight.clear();
    });
    socket.on('data', (chunk: Buffer) => {
      try {
        for (const frame of reader.push(chunk)) this.onFrame(socket, frame, inFlight, identity, peer);
      } catch (err) {
        const why = err instanceof FrameError ? err.message : `unexpected: ${String(err)}`;
        this.log.warn({ peer, reason: why }, 'lease frame connection closed: protocol violation');
        socket.destroy();
      }
    });
  }

  private onFrame(socket: net.Socket, frame: Frame, inFlight: Map<number, () => void>, identity: Identity, peer: string): void {
    if (frame.kind === FrameKind.CANCEL) {
      inFlight.get(frame.callId)?.();
      return;
    }
    if (frame.kind !== FrameKind.REQUEST) throw new FrameError(`a client sent a frame of kind ${FrameKind[frame.kind]}`);
    if (inFlight.has(frame.callId)) throw new FrameError(`call id ${frame.callId} is already in flight`);
    if (inFlight.size >= MAX_CALLS_IN_FLIGHT) throw new FrameError(`more than ${MAX_CALLS_IN_FLIGHT} calls in flight`);
    const name = frameMethodOf(frame.arg);
    const method = name && this.methods.get(name);
    if (!method) {
      this.reply(
        socket,
        frame.callId,
        { error: new SdmeshError(status.UNIMPLEMENTED, `method ${frame.arg} is not served on the lease frame socket`) },
        undefined,
      );
      return;
    }
    let onCancel: (() => void) | undefined;
    let cancelled = false;
    inFlight.set(frame.callId, () => {
      cancelled = true;
      onCancel?.();
    });
    const incoming: IncomingCall = {
      // Never throws: an undecodable request answers INVALID_ARGUMENT through the call path, as on gRPC.
      request: decodeRequest(method.definition.requestType, `/${method.fullMethod}`, frame.body),
      deadline: frame.deadlineMs ? new Date(Date.now() + frame.deadlineMs) : undefined,
      metadata: new Metadata(),
      peer,
      identity,
      onCancel: (cancel) => {
        onCancel = cancel;
        if (cancelled) cancel();
      },
    };
    this.calls++;
    void method.call(incoming).then((out) => {
      inFlight.delete(frame.callId);
      // A cancelled call's answer is awaited no more (the client has forgotten its id).
      if (!cancelled && !socket.destroyed) this.reply(socket, frame.callId, out, method);
      if (--this.calls === 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
    });
  }

  private reply(socket: net.Socket, callId: number, out: { result: unknown } | { error: SdmeshError }, method: ServedFrameMethod | undefined): void {
    let frame: Buffer;
    try {
      frame =
        'error' in out
          ? encodeFrame({ callId, kind: FrameKind.ERROR, arg: out.error.code, deadlineMs: 0, body: encodeErrorBody(out.error.reason, out.error.message) })
          : encodeFrame({
              callId,
              kind: FrameKind.REPLY,
              arg: 0,
              deadlineMs: 0,
              body: method!.definition.responseType.encode(method!.definition.responseType.fromPartial(out.result)).finish(),
            });
    } catch (err) {
      this.log.error({ err: String(err), callId }, 'lease frame answer could not be encoded');
      frame = encodeFrame({
        callId,
        kind: FrameKind.ERROR,
        arg: status.INTERNAL,
        deadlineMs: 0,
        body: encodeErrorBody(Reason.INTERNAL, `internal error: ${String(err)}`),
      });
    }
    socket.write(frame);
    // A peer that sends and does not read: stop reading its requests until it has taken the answers
    // (the kernel's buffer then holds back its writes), so its unsent answers stay bounded.
    if (socket.writableLength > MAX_UNSENT_ANSWER_BYTES && !socket.isPaused()) {
      socket.pause();
      socket.once('drain', () => socket.resume());
    }
  }
}
