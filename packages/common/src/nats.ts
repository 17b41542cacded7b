import { randomUUID } from 'node:crypto';
import { connect, headers, type Msg, type NatsConnection, type Subscription } from '@nats-io/transport-node';
import { jetstreamManager, RetentionPolicy, StorageType } from '@nats-io/jetstream';
import { Kvm, type KV, type KvOptions } from '@nats-io/kv';
import type { Logger } from './logger';
import { Event } from './gen/sdmesh/v1/events';

export type { NatsConnection, KV };

export const EVENT_SUBJECT_PREFIX = 'sdmesh.events';
export const EVENT_STREAM = 'SDMESH_EVENTS';

/**
 * Connects to NATS and keeps reconnecting forever: a NATS outage must never take a storage
 * service down. Status changes are logged.
 */
export async function connectNats(opts: { url: string; name: string; log: Logger }): Promise<NatsConnection> {
  const nc = await connect({
    servers: opts.url,
    name: opts.name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    reconnectJitter: 100,
    waitOnFirstConnect: true,
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
    default:
      return '';
  }
}

const token = (s: string) => (s ? s.replace(/[^A-Za-z0-9_-]/g, '_') : '_');

/** Subject of an event: sdmesh.events.<kind>.<domain id or _>. */
export function eventSubject(p: EventPayload): string {
  return `${EVENT_SUBJECT_PREFIX}.${p.$case}.${token(domainOf(p))}`;
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

  publish(payload: EventPayload): Event {
    const event = Event.fromPartial({
      id: randomUUID(),
      time: new Date(),
      sourceHost: this.source.host,
      sourceService: this.source.service,
      payload,
    });
    if (!this.nc || this.nc.isClosed()) return event;
    try {
      const h = headers();
      h.set('Nats-Msg-Id', event.id);
      this.nc.publish(eventSubject(payload), Event.encode(event).finish(), { headers: h });
      this.published++;
    } catch (err) {
      this.log?.warn({ err: String(err), kind: payload.$case }, 'event not published');
    }
    return event;
  }
}

/** Creates (or updates) the JetStream stream that keeps events for replay. */
export async function ensureEventStream(nc: NatsConnection, maxAgeSeconds = 7 * 24 * 3600): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const config = {
    name: EVENT_STREAM,
    subjects: [`${EVENT_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    max_age: maxAgeSeconds * 1e9,
    duplicate_window: 120 * 1e9,
  };
  try {
    await jsm.streams.info(EVENT_STREAM);
    await jsm.streams.update(EVENT_STREAM, config);
  } catch {
    await jsm.streams.add(config);
  }
}

/** Subscribes to events matching a subject filter (default: all), decoding each one. */
export function subscribeEvents(
  nc: NatsConnection,
  onEvent: (event: Event, subject: string) => void,
  filter = `${EVENT_SUBJECT_PREFIX}.>`,
): Subscription {
  return nc.subscribe(filter, {
    callback: (err: Error | null, msg: Msg) => {
      if (err) return;
      try {
        onEvent(Event.decode(msg.data), msg.subject);
      } catch {
        // A foreign or torn message on our subjects is ignored, never a crash.
      }
    },
  });
}

/** Opens (creating if needed) a JetStream KV bucket. Works with nats-server 2.9. */
export async function openKv(nc: NatsConnection, bucket: string, opts: Partial<KvOptions> = {}): Promise<KV> {
  return new Kvm(nc).create(bucket, { history: 1, ...opts });
}
