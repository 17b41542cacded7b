import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import {
  connect,
  headers,
  usernamePasswordAuthenticator,
  type Msg,
  type NodeConnectionOptions,
  type NatsConnection,
  type Subscription,
} from '@nats-io/transport-node';
import { jetstreamManager, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import { Kvm, type KV, type KvOptions } from '@nats-io/kv';
import { ConfigError } from './config';
import type { Logger } from './logger';
import { Event } from './gen/sdmesh/v1/events';

export type { NatsConnection, KV, NodeConnectionOptions };

export const EVENT_SUBJECT_PREFIX = 'sdmesh.events';
export const EVENT_STREAM = 'SDMESH_EVENTS';

/**
 * How a workload proves itself to NATS: a user whose password is read from a file (on every
 * connect, so a rotated password is picked up by the next reconnect), over TLS verified with
 * a CA file. Both absent only with --insecure.
 */
export interface NatsAuth {
  user?: string;
  passwordFile?: string;
  /** PEM CA bundle that signed the nats-server certificate; set = TLS required. */
  caFile?: string;
}

/**
 * The NATS credentials of a service from its common options. Without --insecure a service
 * refuses to start without them (ConfigError: one line naming the flags).
 */
export function natsAuthFromConfig(config: { natsUser: string; natsPasswordFile: string; tlsCa: string; insecure: boolean }): NatsAuth {
  const auth: NatsAuth = { user: config.natsUser || undefined, passwordFile: config.natsPasswordFile || undefined, caFile: config.tlsCa || undefined };
  if (!!auth.user !== !!auth.passwordFile)
    throw new ConfigError('--nats-user and --nats-password-file go together (SDMESH_NATS_USER, SDMESH_NATS_PASSWORD_FILE)');
  if (config.insecure) return auth;
  if (!auth.user)
    throw new ConfigError('no NATS credentials: pass --nats-user and --nats-password-file (SDMESH_NATS_USER, SDMESH_NATS_PASSWORD_FILE), or --insecure');
  if (!auth.caFile) throw new ConfigError('NATS needs TLS: pass --tls-ca (SDMESH_TLS_CA), or --insecure');
  readPasswordFile(auth.passwordFile!, true);
  return auth;
}

/** natsAuthFromConfig for a service's main: a config error is printed on one line, exit 2. */
export function natsAuthOrExit(service: string, config: Parameters<typeof natsAuthFromConfig>[0]): NatsAuth {
  try {
    return natsAuthFromConfig(config);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`sdmesh-${service}: error: ${err.message}\n`);
    process.exit(2);
  }
}

function readPasswordFile(file: string, initial = false): string {
  try {
    const password = fs.readFileSync(file, 'utf8').trim();
    if (!password) throw new Error('empty file');
    return password;
  } catch (err) {
    if (initial) throw new ConfigError(`--nats-password-file ${file}: ${(err as Error).message}`);
    throw err;
  }
}

/** The servers of a NATS URL option: one URL, or the comma-separated URLs of a cluster's nodes. */
export function natsServers(urls: string | readonly string[]): string[] {
  return (typeof urls === 'string' ? urls.split(',') : [...urls]).map((u) => u.trim()).filter(Boolean);
}

/**
 * nats.js connection options for these credentials (also used by sdmctl and the tests). With
 * several URLs (the nodes of a NATS cluster) the client connects to any of them and moves to
 * another when its node goes away; it also learns the other nodes from the cluster itself.
 */
export function natsConnectionOptions(url: string | readonly string[], auth: NatsAuth = {}): NodeConnectionOptions {
  return {
    servers: natsServers(url),
    ...(auth.user && auth.passwordFile ? { authenticator: usernamePasswordAuthenticator(auth.user, () => readPasswordFile(auth.passwordFile!)) } : {}),
    ...(auth.caFile ? { tls: { caFile: auth.caFile } } : {}),
  };
}

/**
 * Connects to NATS and keeps reconnecting forever: a NATS outage must never take a storage
 * service down. Status changes are logged. Authorization errors do not stop the reconnecting
 * either (ignoreAuthErrorAbort): during a password rotation the server may know the new
 * password before the file here has it.
 */
export async function connectNats(opts: { url: string | readonly string[]; name: string; log: Logger; auth?: NatsAuth }): Promise<NatsConnection> {
  const nc = await connect({
    ...natsConnectionOptions(opts.url, opts.auth),
    name: opts.name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    reconnectJitter: 100,
    waitOnFirstConnect: true,
    ignoreAuthErrorAbort: true,
    pingInterval: 5000,
  });
  void (async () => {
    for await (const s of nc.status()) {
      if (s.type === 'disconnect') opts.log.warn({ server: s.server }, 'NATS disconnected; reconnecting');
      else if (s.type === 'reconnect') opts.log.info({ server: s.server }, 'NATS reconnected');
      else if (s.type === 'error') opts.log.warn({ err: String(s.error) }, 'NATS error');
    }
  })().catch(() => undefined);
  return nc;
}

/** The payload kind of an event, which is also its subject's second token. */
export type EventKind = NonNullable<Event['payload']>['$case'];

type EventPayload = NonNullable<Event['payload']>;

function domainOf(p: EventPayload): string {
  switch (p.$case) {
    case 'domain':
      return p.domain.domain?.id ?? '';
    case 'volume':
      return p.volume.domainId;
    case 'lease':
      return p.lease.lease?.lockspace ?? '';
    case 'lockspace':
      return p.lockspace.lockspace;
    case 'gc':
      return p.gc.domainId;
    case 'diskAttachment':
      return p.diskAttachment.storageDomainId;
    default:
      return '';
  }
}

/** A name as one subject token: anything but letters, digits, `_` and `-` becomes `_`; empty is `_`. */
export const subjectToken = (s: string) => (s ? s.replace(/[^A-Za-z0-9_-]/g, '_') : '_');

/**
 * Subject of an event: sdmesh.events.<kind>.<domain id or _>.<source host>. The last token is
 * the publishing host so NATS permissions can pin each host to its own events.
 */
export function eventSubject(p: EventPayload, sourceHost: string): string {
  return `${EVENT_SUBJECT_PREFIX}.${p.$case}.${subjectToken(domainOf(p))}.${subjectToken(sourceHost)}`;
}

/** Subject filter of events, each part a token or `*` (the host defaults to any). */
export function eventFilter(kind = '*', domain = '*', host = '*'): string {
  return `${EVENT_SUBJECT_PREFIX}.${kind}.${domain}.${host === '*' ? host : subjectToken(host)}`;
}

/**
 * Publishes typed events. Uses core NATS publish, which the client buffers while it is
 * reconnecting; the JetStream stream captures the subjects for replay. Events are
 * notifications, never the source of truth (that is the storage), so a lost event during a
 * long outage loses no data.
 */
export class EventPublisher {
  published = 0;
  constructor(
    private nc: NatsConnection | undefined,
    private readonly source: { host: string; service: string },
    private readonly log?: Logger,
  ) {}

  /** Starts publishing on nc (events published before are dropped: NATS was not there yet). */
  attach(nc: NatsConnection): void {
    this.nc = nc;
  }

  /** `time`: when it happened, if the event is published later than that (default: now). */
  publish(payload: EventPayload, time = new Date()): Event {
    const event = Event.fromPartial({
      id: randomUUID(),
      time,
      sourceHost: this.source.host,
      sourceService: this.source.service,
      payload,
    });
    if (!this.nc || this.nc.isClosed()) return event;
    try {
      const h = headers();
      h.set('Nats-Msg-Id', event.id);
      this.nc.publish(eventSubject(payload, this.source.host), Event.encode(event).finish(), { headers: h });
      this.published++;
    } catch (err) {
      this.log?.warn({ err: String(err), kind: payload.$case }, 'event not published');
    }
    return event;
  }
}

/**
 * How many NATS nodes keep a copy of each stream and KV bucket (JetStream's num_replicas): 1 on
 * a single nats-server; 3 on a clustered NATS, so that losing one node loses no operation state
 * and no event (a JetStream cluster needs a majority of a stream's replicas to write it).
 */
export const MAX_NATS_REPLICAS = 5;

/**
 * JetStream is there but not ready: no server answered (no stream or metadata leader yet, a
 * reconnect), the answer did not come, or a clustered NATS has too few nodes up (or known to its
 * metadata leader yet: "no suitable peers for placement") for the replicas asked for. Seen while
 * a NATS cluster starts or a node of it has just died.
 */
export const isJetStreamNotReady = (err: unknown) =>
  /no responders|jetstream is not enabled|timeout|insufficient resources|no suitable peers|temporarily unavailable|\b503\b/i.test(
    String((err as Error)?.message ?? err),
  );

/**
 * Runs an idempotent JetStream setup call again while JetStream is not ready (up to
 * `timeoutMs`), so a scheduler started together with its NATS cluster (Kubernetes starts them
 * at once) waits for it instead of failing its start.
 */
async function whenJetStreamReady<T>(call: () => Promise<T>, timeoutMs = 60_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (!isJetStreamNotReady(err) || Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/** Creates (or updates: replicas, retention) the JetStream stream that keeps events for replay. */
export async function ensureEventStream(nc: NatsConnection, opts: { maxAgeSeconds?: number; replicas?: number } = {}): Promise<void> {
  return whenJetStreamReady(() => ensureEventStreamNow(nc, opts));
}

async function ensureEventStreamNow(nc: NatsConnection, opts: { maxAgeSeconds?: number; replicas?: number }): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const config = {
    name: EVENT_STREAM,
    subjects: [`${EVENT_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    max_age: (opts.maxAgeSeconds ?? 7 * 24 * 3600) * 1e9,
    duplicate_window: 120 * 1e9,
    num_replicas: opts.replicas ?? 1,
  };
  const exists = await jsm.streams.info(EVENT_STREAM).then(
    () => true,
    (err: Error) => {
      if (/stream not found/i.test(err.message)) return false;
      throw err;
    },
  );
  if (exists) await jsm.streams.update(EVENT_STREAM, config);
  else await jsm.streams.add(config);
}

/**
 * Subscribes to events matching a subject filter (default: all), decoding each one. An event
 * whose source host is not the host token of its subject is dropped: NATS lets a host publish
 * only on its own subjects, so such an event is forged (or foreign).
 */
export function subscribeEvents(nc: NatsConnection, onEvent: (event: Event, subject: string) => void, filter = `${EVENT_SUBJECT_PREFIX}.>`): Subscription {
  return nc.subscribe(filter, {
    callback: (err: Error | null, msg: Msg) => {
      if (err) return;
      let event: Event;
      try {
        event = Event.decode(msg.data);
      } catch {
        // A foreign or torn message on our subjects is ignored, never a crash.
        return;
      }
      if (msg.subject.slice(msg.subject.lastIndexOf('.') + 1) !== subjectToken(event.sourceHost)) return;
      onEvent(event, msg.subject);
    },
  });
}

/**
 * Opens (creating if needed) a JetStream KV bucket with `replicas` copies (default 1). An
 * existing bucket with another replica count is updated to it (JetStream moves the data; a
 * clustered NATS allows this, a single server refuses more than 1). Works with nats-server 2.9.
 */
export async function openKv(nc: NatsConnection, bucket: string, opts: Partial<KvOptions> = {}): Promise<KV> {
  return whenJetStreamReady(() => openKvNow(nc, bucket, opts));
}

async function openKvNow(nc: NatsConnection, bucket: string, opts: Partial<KvOptions>): Promise<KV> {
  const replicas = opts.replicas ?? 1;
  const kv = await new Kvm(nc).create(bucket, { history: 1, ...opts, replicas });
  const jsm = await jetstreamManager(nc);
  const stream = `KV_${bucket}`;
  const info = await jsm.streams.info(stream);
  if (info.config.num_replicas !== replicas) await jsm.streams.update(stream, { ...info.config, num_replicas: replicas });
  return kv;
}
