import fs from 'node:fs';
import type net from 'node:net';
import type { PeerCertificate } from 'node:tls';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation, service as healthServiceDefinition } from 'grpc-health-check';
import type { Logger } from './logger';
import type { ServiceMetrics } from './metrics';
import { deadlineExceeded, SdmeshError, unavailable } from './errors';
import { AuthDenied, auditTarget, Authorizer, unauthenticated } from './authz';
import { describeIdentity, type Identity } from './identity';
import { identityOfCertificate, type MeshTls } from './tls';
import { decodeRequest, UndecodableRequest } from './request-decode';
import { listenUnixSocket, localPeerOf } from './local-socket';
import { LeaseFramesServer, type FramedMethod, type IncomingCall, type ServedFrameMethod } from './lease-frames-server';
import { FRAME_METHODS, MAX_TIMER_MS } from './lease-frames';
import { Reason } from './reasons';
import { methodPath, TLS_CHANNEL_OPTIONS, type DeepPartial, type Req, type Res, type ServiceDefinition } from './grpc-client';

// Clients live in grpc-client.ts (a process that only calls need not load the server side).
export { callOptions, createClient, TLS_CHANNEL_OPTIONS } from './grpc-client';
export type { CallOptions, ServiceClient, ServiceDefinition } from './grpc-client';

/** What a handler knows about its call. */
export interface CallContext {
  method: string;
  /** When the caller stops waiting; pass it on to outgoing calls (see `callOptions`). */
  deadline?: Date;
  /** Aborted when the client cancels or the deadline passes. */
  signal: AbortSignal;
  metadata: grpc.Metadata;
  peer: string;
  /** Who is calling (authenticated and authorized before the handler runs). */
  identity: Identity;
  log: Logger;
}

/** A service implementation: plain async functions; streaming methods are async generators. */
export type ServiceHandlers<D extends ServiceDefinition> = {
  [K in keyof D['methods']]: D['methods'][K]['responseStream'] extends true
    ? (request: Req<D['methods'][K]>, ctx: CallContext) => AsyncIterable<Res<D['methods'][K]>>
    : (request: Req<D['methods'][K]>, ctx: CallContext) => Promise<DeepPartial<Res<D['methods'][K]>>>;
};

export interface RegisteredService {
  definition: ServiceDefinition;
  // Handlers are checked against the definition where they are built (see `service()`).
  handlers: Record<string, (request: never, ctx: CallContext) => unknown>;
}

/** Pairs a definition with its handlers, type-checked. */
export function service<D extends ServiceDefinition>(definition: D, handlers: ServiceHandlers<D>): RegisteredService {
  return { definition, handlers: handlers as unknown as RegisteredService['handlers'] };
}

function grpcServiceDefinition(def: ServiceDefinition): grpc.ServiceDefinition {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [key, m] of Object.entries(def.methods)) {
    out[key] = {
      path: methodPath(def, m),
      requestStream: m.requestStream,
      responseStream: m.responseStream,
      requestSerialize: (v: unknown) => Buffer.from(m.requestType.encode(v).finish()),
      // Never throws (grpc-js would answer INTERNAL): see request-decode.ts.
      requestDeserialize: (b: Buffer) => decodeRequest(m.requestType, methodPath(def, m), b),
      responseSerialize: (v: unknown) => Buffer.from(m.responseType.encode(m.responseType.fromPartial(v)).finish()),
      responseDeserialize: (b: Buffer) => m.responseType.decode(b),
      originalName: m.name,
    };
  }
  return out;
}

/** The proto tree shipped with sdmesh, for server reflection. */
export const PROTO_DIR = path.resolve(__dirname, '../../../proto');

function reflectionPackage(): protoLoader.PackageDefinition {
  const files = ['common', 'events', 'lease_manager', 'metadata_tx', 'data_mover', 'gc', 'scheduler'].map((f) => `sdmesh/v1/${f}.proto`);
  return protoLoader.loadSync(files, { includeDirs: [PROTO_DIR], keepCase: true });
}

export interface GrpcServerOptions {
  serviceName: string;
  host: string;
  port: number;
  services: RegisteredService[];
  log: Logger;
  metrics?: ServiceMetrics;
  /** mTLS credentials (or the --insecure opt-out) of the TCP port. */
  tls: MeshTls;
  authorizer: Authorizer;
  /**
   * A unix socket served besides the TCP port, for this host's own processes: callers are
   * identified by the kernel (SO_PEERCRED), not by certificates. Created 0600.
   */
  localSocket?: string;
  /**
   * The lease frame socket (lease-frames.ts), served besides `localSocket` for the lease calls of
   * this host's processes: same peer credentials, same call path, a lighter transport. Created 0600.
   */
  leaseFramesSocket?: string;
  /**
   * Serve the TCP port (default). False: only `localSocket` (a CSI plugin's endpoint, where the
   * caller is a process of this host and no port should be open).
   */
  tcp?: boolean;
  /** gRPC server reflection (default on; production values turn it off). */
  reflection?: boolean;
  /** Connections are closed (gracefully) after this long, so they re-handshake with current certificates. */
  maxConnectionAgeMs?: number;
  /** How long calls of an aged connection may still run. */
  maxConnectionAgeGraceMs?: number;
}

/**
 * Metadata key under which the authentication interceptor hands the caller's identity to the
 * handler wrapper (the certificate is parsed once per call). Whatever a client sends under this
 * key is overwritten: the interceptor runs on every call before any handler.
 */
const IDENTITY_METADATA = 'x-sdmesh-authenticated-identity';

/** Peer address we give connections of the local socket: `local:<pid>:<uid>` (no TCP peer looks like this). */
const LOCAL_PEER = /^local:(\d+):(\d+)$/;

/**
 * A grpc-js server with the standard health service, server reflection, error mapping,
 * deadline handling, call logging/metrics and graceful shutdown.
 */
export class GrpcServer {
  readonly server: grpc.Server;
  readonly health: HealthImplementation;
  private inFlight = new Set<AbortController>();
  private draining = false;
  private localServer?: net.Server;
  /** The unary methods the lease frame socket serves, by full name (filled by wrap()). */
  private readonly framed = new Map<string, ServedFrameMethod>();
  private framesServer?: LeaseFramesServer;
  port = 0;

  constructor(private readonly opts: GrpcServerOptions) {
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': 16 * 1024 * 1024,
      // A connection's certificates are checked at its handshake only: connections are recycled
      // so that a rotated or retired certificate stops being honoured within a bounded time.
      'grpc.max_connection_age_ms': opts.maxConnectionAgeMs ?? 3_600_000,
      'grpc.max_connection_age_grace_ms': opts.maxConnectionAgeGraceMs ?? 600_000,
      interceptors: [this.authenticate],
    });
    const statuses: Record<string, 'SERVING' | 'NOT_SERVING'> = { '': 'NOT_SERVING' };
    for (const s of opts.services) statuses[s.definition.fullName] = 'NOT_SERVING';
    this.health = new HealthImplementation(statuses);
    this.health.addToServer(this.server);
    if (opts.reflection ?? true) new ReflectionService(reflectionPackage()).addToServer(this.server);
    for (const s of opts.services) this.server.addService(grpcServiceDefinition(s.definition), this.wrap(s));
  }

  /** The caller: a local process (unix socket), a certificate's identity, or `insecure`. */
  private identityOf(call: { getPeer(): string; getAuthContext(): { sslPeerCertificate?: PeerCertificate } }): Identity | undefined {
    const local = LOCAL_PEER.exec(call.getPeer());
    if (local) return { kind: 'local', pid: Number(local[1]), uid: Number(local[2]) };
    if (this.opts.tls.insecure) return { kind: 'insecure' };
    return identityOfCertificate(call.getAuthContext().sslPeerCertificate);
  }

  private countDenied(method: string, reason: string): void {
    this.opts.metrics?.authDenied.inc({ service: this.opts.serviceName, method, reason });
  }

  /**
   * Refuses every call (health and reflection included) from a peer without a trusted
   * certificate naming an sdmesh identity, before any request bytes are read.
   */
  private readonly authenticate: grpc.ServerInterceptor = (descriptor, call) => {
    const listener = new grpc.ServerListenerBuilder()
      .withOnReceiveMetadata((metadata, next) => {
        const identity = this.identityOf(call);
        if (identity) {
          metadata.set(IDENTITY_METADATA, JSON.stringify(identity));
          return next(metadata);
        }
        const method = descriptor.path.replace(/^\//, '');
        const err = unauthenticated(method);
        this.countDenied(method, err.denyReason);
        this.opts.log.warn({ method, peer: call.getPeer(), reason: err.denyReason }, 'call refused: unauthenticated');
        call.sendStatus({ code: err.code, details: err.message, metadata: err.toServiceError().metadata });
      })
      .build();
    return new grpc.ServerInterceptingCall(call, new grpc.ResponderBuilder().withStart((next) => next(listener)).build());
  };

  private wrap(s: RegisteredService): grpc.UntypedServiceImplementation {
    const impl: grpc.UntypedServiceImplementation = {};
    for (const [key, m] of Object.entries(s.definition.methods)) {
      const handler = s.handlers[key];
      if (!handler) throw new Error(`${s.definition.fullName}: no handler for ${m.name}`);
      const method = `${s.definition.name}/${m.name}`;
      const fullMethod = `${s.definition.fullName}/${m.name}`;
      // One child logger per method, made once: a pino child per call costs its bindings' serialization (issue 17: lease calls).
      const log = this.opts.log.child({ method });
      if (m.responseStream) {
        impl[key] = (call: grpc.ServerWritableStream<unknown, unknown>) => {
          void this.run(method, fullMethod, log, this.incoming(call), async (ctx) => {
            for await (const item of handler(call.request as never, ctx) as AsyncIterable<unknown>) {
              if (ctx.signal.aborted) break;
              if (!call.write(item)) await new Promise((r) => call.once('drain', r));
            }
          }).then((err) => (err ? call.emit('error', err.toServiceError()) : call.end()));
        };
      } else {
        const unary = this.unary(method, fullMethod, log, handler);
        if ((FRAME_METHODS as readonly string[]).includes(fullMethod)) this.framed.set(fullMethod, { ...unary, definition: m });
        impl[key] = (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
          void unary.call(this.incoming(call)).then((out) => ('error' in out ? callback(out.error.toServiceError()) : callback(null, out.result)));
        };
      }
    }
    return impl;
  }

  /**
   * A unary method's one code path, whatever the transport (gRPC, or the lease frame socket):
   * authorization, deadline, cancellation, the handler, audit, metrics and error mapping.
   */
  private unary(method: string, fullMethod: string, log: Logger, handler: (request: never, ctx: CallContext) => unknown): FramedMethod {
    return {
      fullMethod,
      call: async (incoming) => {
        let result: unknown;
        const error = await this.run(method, fullMethod, log, incoming, async (ctx) => {
          result = await handler(incoming.request as never, ctx);
        });
        return error ? { error } : { result };
      },
    };
  }

  /** A grpc-js call as the transport-independent IncomingCall. */
  private incoming(call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>): IncomingCall {
    const rawDeadline = call.getDeadline();
    const deadline = rawDeadline instanceof Date ? rawDeadline : Number.isFinite(rawDeadline) && rawDeadline > 0 ? new Date(rawDeadline) : undefined;
    const passed = call.metadata.get(IDENTITY_METADATA)[0];
    const identity = typeof passed === 'string' ? (JSON.parse(passed) as Identity) : this.identityOf(call);
    call.metadata.remove(IDENTITY_METADATA);
    return {
      request: call.request,
      deadline,
      metadata: call.metadata,
      peer: call.getPeer(),
      identity,
      // grpc-js also emits 'cancelled' once it has sent the answer: run() ignores a cancel after the handler.
      onCancel: (cancel) => call.on('cancelled', cancel),
    };
  }

  private async run(
    method: string,
    fullMethod: string,
    log: Logger,
    call: IncomingCall,
    body: (ctx: CallContext) => Promise<void>,
  ): Promise<SdmeshError | null> {
    const started = process.hrtime.bigint();
    const controller = new AbortController();
    const deadline = call.deadline;
    let timer: NodeJS.Timeout | undefined;
    const ms = deadline ? deadline.getTime() - Date.now() : Infinity;
    if (ms <= MAX_TIMER_MS) {
      timer = setTimeout(() => controller.abort(deadlineExceeded(`deadline passed while running ${method}`)), Math.max(0, ms));
    }
    // Only a cancel while the handler runs means something (an abort after it built an error with its stack trace per call).
    let handled = false;
    call.onCancel(() => {
      if (!handled) controller.abort(new SdmeshError(grpc.status.CANCELLED, 'call cancelled by the client'));
    });
    const identity = call.identity;
    const ctx: CallContext = {
      method,
      deadline,
      signal: controller.signal,
      metadata: call.metadata,
      peer: call.peer,
      identity: identity ?? { kind: 'insecure' },
      log,
    };
    this.inFlight.add(controller);
    let error: SdmeshError | null = null;
    let mutates = false;
    try {
      mutates = this.opts.authorizer.check(fullMethod, identity).mutates;
      if (this.draining) throw unavailable(`${this.opts.serviceName} is shutting down`, Reason.SHUTTING_DOWN);
      if (controller.signal.aborted) throw SdmeshError.from(controller.signal.reason);
      if (call.request instanceof UndecodableRequest) throw call.request.error;
      await body(ctx);
    } catch (err) {
      error = SdmeshError.from(err);
      if (err instanceof AuthDenied) {
        this.countDenied(method, err.denyReason);
        log.warn({ who: describeIdentity(identity), peer: ctx.peer, reason: err.denyReason, message: err.message }, 'call refused: not authorized');
        mutates = this.opts.authorizer.policy(fullMethod)?.mutates ?? true;
      } else if (error.code === grpc.status.INTERNAL) log.error({ err }, 'call failed unexpectedly');
      else log.debug({ code: grpc.status[error.code], reason: error.reason, message: error.message }, 'call refused');
    } finally {
      handled = true;
      if (timer) clearTimeout(timer);
      this.inFlight.delete(controller);
    }
    if (mutates) {
      // The audit trail of every call that could change something, whatever its outcome.
      log.info(
        {
          audit: {
            who: describeIdentity(identity),
            method: fullMethod,
            target: auditTarget(call.request),
            outcome: error ? grpc.status[error.code] : 'OK',
            reason: error?.reason,
          },
        },
        'audit',
      );
    }
    const code = error ? error.code : grpc.status.OK;
    this.opts.metrics?.grpcHandled.inc({ service: this.opts.serviceName, method, code: grpc.status[code] });
    this.opts.metrics?.grpcDuration.observe({ service: this.opts.serviceName, method }, Number(process.hrtime.bigint() - started) / 1e9);
    return error;
  }

  async start(): Promise<number> {
    if (this.opts.tls.insecure && this.opts.tcp !== false)
      this.opts.log.warn('INSECURE: gRPC is served in plaintext and every caller is trusted (--insecure); never run this way in production');
    if (this.opts.tcp !== false)
      this.port = await new Promise<number>((resolve, reject) =>
        this.server.bindAsync(`${this.opts.host}:${this.opts.port}`, this.opts.tls.serverCredentials(), (err, port) => (err ? reject(err) : resolve(port))),
      );
    if (this.opts.localSocket) await this.listenLocal(this.opts.localSocket);
    if (this.opts.leaseFramesSocket) {
      const frames = new LeaseFramesServer(this.opts.leaseFramesSocket, this.framed, this.opts.log.child({ component: 'lease-frames' }));
      await frames.listen();
      // Only once it listens: shutdown() removes the socket file, and a failed listen's path (not a socket) is not ours.
      this.framesServer = frames;
    }
    this.setServing(true);
    return this.port;
  }

  /**
   * Serves the same services on a unix socket. Each connection is tagged with the peer's
   * pid and uid from SO_PEERCRED and handed to grpc-js, which then reports them as the
   * call's peer; the authorization table decides what `local` callers may do.
   */
  private async listenLocal(socketPath: string): Promise<void> {
    const injector = this.server.createConnectionInjector(grpc.ServerCredentials.createInsecure());
    this.localServer = await listenUnixSocket(socketPath, (socket) => {
      try {
        const cred = localPeerOf(socket);
        Object.defineProperty(socket, 'remoteAddress', { value: `local:${cred.pid}:${cred.uid}` });
        injector.injectConnection(socket);
      } catch (err) {
        this.opts.log.warn({ err: String(err) }, 'local connection refused: peer credentials unavailable');
        socket.destroy();
      }
    });
  }

  /** What the health service says: SERVING from start until shutdown begins. */
  serving = false;

  setServing(serving: boolean): void {
    this.serving = serving;
    const st = serving ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', st);
    for (const s of this.opts.services) this.health.setStatus(s.definition.fullName, st);
  }

  /** Health goes NOT_SERVING, new calls are refused, in-flight calls get graceMs to finish. */
  async shutdown(graceMs: number): Promise<void> {
    this.setServing(false);
    this.draining = true;
    // grpc-js waits for its own calls only: the lease frame socket's get the same grace.
    const done = new Promise<void>((resolve) => this.server.tryShutdown(() => resolve())).then(() => this.framesServer?.idle());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), graceMs)));
    if ((await Promise.race([done, timeout])) === 'timeout') {
      this.opts.log.warn({ inFlight: this.inFlight.size }, 'grace period over: cancelling calls still running');
      for (const c of this.inFlight) c.abort(unavailable('server shutting down'));
      this.server.forceShutdown();
    }
    clearTimeout(timer);
    if (this.localServer) {
      // Stop accepting; the connections already handed to grpc-js ended with the server.
      this.localServer.close();
      fs.rmSync(this.opts.localSocket!, { force: true });
    }
    if (this.framesServer) {
      this.framesServer.close();
      fs.rmSync(this.opts.leaseFramesSocket!, { force: true });
    }
  }
}

/** Calls grpc.health.v1.Health/Check; resolves to the status name (e.g. "SERVING"). */
export async function checkHealth(address: string, credentials: grpc.ChannelCredentials, serviceName = '', timeoutMs = 3000): Promise<string> {
  const Ctor = grpc.makeGenericClientConstructor(healthServiceDefinition as unknown as grpc.ServiceDefinition, 'Health');
  const client = new Ctor(address, credentials, TLS_CHANNEL_OPTIONS);
  try {
    return await new Promise<string>((resolve, reject) =>
      (client as unknown as { check: (r: object, o: object, cb: (e: Error | null, r: { status: string | number }) => void) => void }).check(
        { service: serviceName },
        { deadline: Date.now() + timeoutMs },
        (err, res) => (err ? reject(SdmeshError.fromGrpc(err)) : resolve(String(res.status))),
      ),
    );
  } finally {
    client.close();
  }
}
