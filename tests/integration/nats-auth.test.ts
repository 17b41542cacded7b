import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { jetstreamManager } from '@nats-io/jetstream';
import { Kvm } from '@nats-io/kv';
import { ensureEventStream, EVENT_STREAM, eventSubject, EventPublisher, natsConnectionOptions, openKv, pb, subscribeEvents, type KV } from '@sdmesh/common';
import { LocalPki, NatsServer, startService, waitFor, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

const heartbeat = (service: string): NonNullable<pb.Event['payload']> => ({
  $case: 'service',
  service: { kind: pb.ServiceEvent_Kind.KIND_HEARTBEAT, service, address: '' },
});

/** Permission errors the server sent on a connection, by subject. */
function violations(nc: NatsConnection): string[] {
  const seen: string[] = [];
  void (async () => {
    for await (const s of nc.status()) if (s.type === 'error' && /Permissions Violation/i.test(String(s.error))) seen.push(String(s.error));
  })();
  return seen;
}

describe('NATS with TLS and per-service users (real nats-server 2.9)', () => {
  const dir = makeTestDir('nats-auth');
  const nats = new NatsServer(path.join(dir, 'nats'), { hosts: ['host1', 'host2'] });
  const conns: NatsConnection[] = [];
  const services: RunningService[] = [];
  const events: { subject: string; event: pb.Event }[] = [];
  let scheduler: NatsConnection;
  let operations: KV;

  const open = async (user: string) => {
    const nc = await connect(nats.connectOptions(user));
    conns.push(nc);
    return nc;
  };
  /** Everything the server delivered so far has reached the reader. */
  const settle = async () => {
    for (const nc of conns) await nc.flush();
    await new Promise((r) => setTimeout(r, 300));
  };

  beforeAll(async () => {
    await nats.start();
    scheduler = await open('scheduler');
    await ensureEventStream(scheduler);
    operations = await openKv(scheduler, 'sdmesh_operations');
    subscribeEvents(await open('sdmctl'), (event, subject) => events.push({ subject, event }));
  });
  afterAll(async () => {
    await Promise.all(services.map((s) => s.process.stop('SIGKILL')));
    for (const nc of conns) await nc.close().catch(() => undefined);
    await nats.stop();
    removeTestDir(dir);
  });

  it('keeps only bcrypt hashes in the server config and the passwords 0600', () => {
    const config = fs.readFileSync(nats.configFile, 'utf8');
    for (const user of ['scheduler', 'host1', 'host2', 'sdmctl']) {
      const file = nats.passwordFile(user);
      expect(fs.statSync(file).mode & 0o777).toBe(0o600);
      expect(config).not.toContain(fs.readFileSync(file, 'utf8').trim());
    }
    expect(config).toMatch(/"password": "\$2[ab]\$10\$/);
    expect(fs.statSync(nats.configFile).mode & 0o777).toBe(0o600);
  });

  it('refuses anonymous clients, wrong passwords and clients that do not verify its certificate', async () => {
    await expect(connect({ servers: nats.url, tls: { caFile: nats.caFile } })).rejects.toThrow(/Authorization Violation/);
    const wrong = path.join(dir, 'wrong.password');
    fs.writeFileSync(wrong, 'not-the-password\n', { mode: 0o600 });
    await expect(connect(natsConnectionOptions(nats.url, { user: 'host1', passwordFile: wrong, caFile: nats.caFile }))).rejects.toThrow(
      /Authorization Violation/,
    );
    // No CA: the server insists on TLS and its certificate is not trusted.
    await expect(connect(natsConnectionOptions(nats.url, { user: 'host1', passwordFile: nats.passwordFile('host1') }))).rejects.toThrow(/certificate/i);
    // A CA that did not sign the server's certificate.
    const otherCa = new LocalPki(path.join(dir, 'other-pki')).ensure().caFile;
    await expect(connect(natsConnectionOptions(nats.url, { user: 'host1', passwordFile: nats.passwordFile('host1'), caFile: otherCa }))).rejects.toThrow(
      /certificate/i,
    );
  });

  it('lets the scheduler create buckets and write the KV', async () => {
    await operations.put('op-1', 'written by the scheduler');
    expect((await operations.get('op-1'))?.string()).toBe('written by the scheduler');
    const locks = await openKv(scheduler, 'sdmesh_locks');
    expect(await locks.create('domain/d1', 'scheduler-1')).toBeGreaterThan(0);
  });

  it("refuses a host's writes to the operation KV and its bucket or stream creation; nothing changes", async () => {
    const host1 = await open('host1');
    const denied = violations(host1);
    host1.publish('$KV.sdmesh_operations.op-1', 'forged by host1');
    host1.publish('$KV.sdmesh_operations.op-forged', 'forged by host1');
    await host1.flush();
    await expect(openKv(host1, 'sdmesh_operations')).rejects.toThrow(/Permissions Violation/);
    await expect(openKv(host1, 'sdmesh_evil')).rejects.toThrow(/Permissions Violation/);
    await waitFor('the publish violations reported to host1', () => (denied.some((e) => e.includes('$KV.sdmesh_operations.op-forged')) ? true : undefined));

    expect((await operations.get('op-1'))?.string()).toBe('written by the scheduler');
    expect(await operations.get('op-forged')).toBeNull();
    const streams = (await (await jetstreamManager(scheduler)).streams.names().next()).sort();
    expect(streams).toEqual(['KV_sdmesh_locks', 'KV_sdmesh_operations', EVENT_STREAM].sort());
  });

  it("lets a host publish its own events but not another host's (live subscribers and the stream)", async () => {
    const host1 = await open('host1');
    const denied = violations(host1);
    new EventPublisher(host1, { host: 'host1', service: 'gc' }).publish(heartbeat('own'));
    // host1's credentials with host2's name: the subject ends in .host2, which host1 may not use.
    new EventPublisher(host1, { host: 'host2', service: 'gc' }).publish(heartbeat('as-host2'));
    host1.publish(
      eventSubject(heartbeat('raw'), 'host2'),
      pb.Event.encode(pb.Event.fromPartial({ id: 'x', sourceHost: 'host2', payload: heartbeat('raw') })).finish(),
    );
    // On its own subject but claiming to be host2: allowed by NATS, dropped by subscribers.
    host1.publish(
      eventSubject(heartbeat('claims-host2'), 'host1'),
      pb.Event.encode(pb.Event.fromPartial({ id: 'y', sourceHost: 'host2', payload: heartbeat('claims-host2') })).finish(),
    );
    await waitFor('host1 event delivered', () => events.find((e) => e.event.payload?.$case === 'service' && e.event.payload.service.service === 'own'));
    // The refusals come back on host1's connection as the server's errors: waited for, as in the KV test.
    await waitFor('the publish violations reported to host1', () => (denied.some((e) => e.includes('sdmesh.events.service._.host2')) ? true : undefined));
    // What was refused would have arrived by now (after a round trip on every connection).
    await settle();

    const own = events.find((e) => e.event.payload?.$case === 'service' && e.event.payload.service.service === 'own')!;
    expect(own.subject).toBe('sdmesh.events.service._.host1');
    expect(own.event.sourceHost).toBe('host1');
    expect(events.filter((e) => e.event.sourceHost !== 'host1' || !e.subject.endsWith('.host1'))).toEqual([]);

    // The stream stores what it accepted on its own schedule, after the live subscribers got it:
    // wait until host1's messages are in, then nothing else may be.
    const jsm = await jetstreamManager(scheduler);
    const storedSubjects = () => jsm.streams.info(EVENT_STREAM, { subjects_filter: '>' }).then((info) => info.state.subjects ?? {});
    await waitFor('host1 own events stored in the stream', async () =>
      ((await storedSubjects())['sdmesh.events.service._.host1'] ?? 0) >= 2 ? true : undefined,
    );
    expect(Object.keys(await storedSubjects())).toEqual(['sdmesh.events.service._.host1']);
  });

  it('lets a reader read events and the KV but write neither', async () => {
    const reader = await open('sdmctl');
    const denied = violations(reader);
    await expect(openKv(reader, 'sdmesh_readers_bucket')).rejects.toThrow(/Permissions Violation/);
    const ops = await new Kvm(reader).open('sdmesh_operations');
    expect((await ops.get('op-1'))?.string()).toBe('written by the scheduler');
    await expect(ops.put('op-1', 'forged by a reader')).rejects.toThrow(/Permissions Violation/);
    new EventPublisher(reader, { host: 'sdmctl', service: 'sdmctl' }).publish(heartbeat('from-reader'));
    await waitFor('the publish violation reported to the reader', () => (denied.some((e) => e.includes('sdmesh.events.service._.sdmctl')) ? true : undefined));
    await settle();
    expect(events.some((e) => e.event.sourceHost === 'sdmctl')).toBe(false);
    expect((await operations.get('op-1'))?.string()).toBe('written by the scheduler');
  });

  it('runs a service with its host credentials; after a password rotation it reconnects with the new one', async () => {
    const gc = await startService('gc', {
      host: 'host2',
      env: {
        ...nats.clientEnv('host2'),
        ...LocalPki.env(nats.pki.forIdentity({ kind: 'host', host: 'host2', service: 'gc' })),
        SDMESH_EVENT_HEARTBEAT_MS: '200',
      },
      logFile: path.join(dir, 'host2-gc.log'),
    });
    services.push(gc);
    const heartbeatsOfGc = () => events.filter((e) => e.subject === 'sdmesh.events.service._.host2' && e.event.sourceService === 'gc').length;
    await waitFor('gc@host2 heartbeats on its own subject', () => (heartbeatsOfGc() > 0 ? true : undefined));

    const oldPassword = fs.readFileSync(nats.passwordFile('host2'), 'utf8');
    const oldFile = path.join(dir, 'old.password');
    fs.writeFileSync(oldFile, oldPassword, { mode: 0o600 });
    nats.rotatePassword('host2');
    expect(fs.readFileSync(nats.passwordFile('host2'), 'utf8')).not.toBe(oldPassword);
    await waitFor(
      'the old password refused',
      async () =>
        await connect(natsConnectionOptions(nats.url, { user: 'host2', passwordFile: oldFile, caFile: nats.caFile })).then(
          (nc) => nc.close().then(() => undefined),
          (err: Error) => (/Authorization Violation/.test(err.message) ? true : undefined),
        ),
    );
    await waitFor('gc@host2 reconnected', () => (gc.lines.some((l) => l.includes('NATS reconnected')) ? true : undefined), 60_000);
    const before = heartbeatsOfGc();
    await waitFor('heartbeats after the rotation', () => (heartbeatsOfGc() > before + 2 ? true : undefined), 60_000);
    expect(gc.process.running()).toBe(true);
  });
});
