/**
 * gRPC clients of sdmesh services: ts-proto's generic definitions as promise-based clients. Apart
 * from the servers (grpc.ts) so that a process that only calls, such as a data-mover copy worker
 * (started for every job), does not load reflection, health and authorization.
 */
import * as grpc from '@grpc/grpc-js';
import { SdmeshError } from './errors';

/** A message type as ts-proto generates it. */
interface MessageType<T> {
  encode(message: T): { finish(): Uint8Array };
  decode(input: Uint8Array): T;
  fromPartial(object: unknown): T;
}

interface MethodDefinition {
  name: string;
  requestType: MessageType<unknown>;
  requestStream: boolean;
  responseType: MessageType<unknown>;
  responseStream: boolean;
}

/** A service as ts-proto's `generic-definitions` output describes it. */
export interface ServiceDefinition {
  name: string;
  fullName: string;
  methods: Record<string, MethodDefinition>;
}

export type Req<M> = M extends { requestType: MessageType<infer R> } ? R : never;
export type Res<M> = M extends { responseType: MessageType<infer R> } ? R : never;
export type DeepPartial<T> = T extends Date | Uint8Array | string | number | boolean | undefined
  ? T
  : T extends Array<infer U>
    ? Array<DeepPartial<U>>
    : T extends object
      ? { [K in keyof T]?: DeepPartial<T[K]> }
      : T;

export const methodPath = (def: ServiceDefinition, m: MethodDefinition) => `/${def.fullName}/${m.name}`;

export interface CallOptions {
  deadline?: Date;
  /** Shorthand for a deadline this many ms from now. */
  timeoutMs?: number;
  metadata?: grpc.Metadata;
  signal?: AbortSignal;
}

/** Options that pass an incoming call's deadline on to an outgoing one. */
export const callOptions = (ctx: { deadline?: Date; signal?: AbortSignal }, extra: CallOptions = {}): CallOptions => ({
  deadline: ctx.deadline,
  signal: ctx.signal,
  ...extra,
});

export type ServiceClient<D extends ServiceDefinition> = {
  [K in keyof D['methods']]: D['methods'][K]['responseStream'] extends true
    ? (request: DeepPartial<Req<D['methods'][K]>>, options?: CallOptions) => AsyncIterable<Res<D['methods'][K]>>
    : (request: DeepPartial<Req<D['methods'][K]>>, options?: CallOptions) => Promise<Res<D['methods'][K]>>;
} & { readonly client: grpc.Client; close(): void };

/** The absolute deadline of a call's options (the earlier of `deadline` and `timeoutMs` from now). */
export function deadlineOf(o: CallOptions): grpc.Deadline | undefined {
  if (o.timeoutMs !== undefined) {
    const t = Date.now() + o.timeoutMs;
    return o.deadline ? Math.min(t, o.deadline.getTime()) : t;
  }
  return o.deadline;
}

/**
 * Servers are identified by the sdmesh identity in their certificate, not by host name
 * (see MeshTls), so the TLS server name is a fixed label rather than the dialled IP address.
 */
export const TLS_CHANNEL_OPTIONS: grpc.ChannelOptions = { 'grpc.ssl_target_name_override': 'sdmesh' };

/** A promise-based client for one service; errors reject as SdmeshError. */
export function createClient<D extends ServiceDefinition>(
  definition: D,
  address: string,
  credentials: grpc.ChannelCredentials,
  channelOptions: grpc.ClientOptions = {},
): ServiceClient<D> {
  const client = new grpc.Client(address, credentials, { ...TLS_CHANNEL_OPTIONS, ...channelOptions });
  const out: Record<string, unknown> = { client, close: () => client.close() };
  for (const [key, m] of Object.entries(definition.methods)) {
    const p = methodPath(definition, m);
    const serialize = (v: unknown) => Buffer.from(m.requestType.encode(m.requestType.fromPartial(v)).finish());
    const deserialize = (b: Buffer) => m.responseType.decode(b);
    if (m.responseStream) {
      out[key] = (request: unknown, o: CallOptions = {}) => {
        const call = client.makeServerStreamRequest(p, serialize, deserialize, request, o.metadata ?? new grpc.Metadata(), {
          deadline: deadlineOf(o),
        });
        o.signal?.addEventListener('abort', () => call.cancel(), { once: true });
        return (async function* () {
          try {
            for await (const item of call) yield item;
          } catch (err) {
            throw SdmeshError.fromGrpc(err);
          } finally {
            call.cancel();
          }
        })();
      };
    } else {
      out[key] = (request: unknown, o: CallOptions = {}) =>
        new Promise((resolve, reject) => {
          const call = client.makeUnaryRequest(
            p,
            serialize,
            deserialize,
            request,
            o.metadata ?? new grpc.Metadata(),
            { deadline: deadlineOf(o) },
            (err, res) => (err ? reject(SdmeshError.fromGrpc(err)) : resolve(res)),
          );
          o.signal?.addEventListener('abort', () => call.cancel(), { once: true });
        });
    }
  }
  return out as ServiceClient<D>;
}
