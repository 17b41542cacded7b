import { randomUUID } from 'node:crypto';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createLogger, openKv, pb, type KV } from '@sdmesh/common';
import { NatsServer, waitFor } from '@sdmesh/localmesh';
import { Registry } from 'prom-client';
import { DiskAttachments, FORMAT_MARKER_KEY } from '../../services/scheduler/src/attachments';
import { NatsKvStore } from '../../services/scheduler/src/kv-store';
import { SchedulerMetrics } from '../../services/scheduler/src/metrics';
import { FAKE_LEAF, fakeAttachmentCluster } from '../harness/attachment-fakes';
import { CountingKv } from '../harness/counting-kv';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The one-time upgrade of disk attachment records (attachments.ts) on a real nats-server: three
 * scheduler replicas (each its own connection and KV store, counting its reads) start at once over
 * a bucket holding records of the old format (`disk.<disk id>`). Each record is moved to its new
 * key exactly once, the marker is written, and calls then read no old key. A record an older
 * replica writes afterwards is moved by the replicas' watch, not lost. The cluster (hosts,
 * volumes) is the unit tests' fake: what is tested here is the KV.
 */
const BUCKET = 'sdmesh_attachments';
const DOMAINS = [randomUUID(), randomUUID()];
const { ATTACHMENT_MODE_EXCLUSIVE: EXCLUSIVE, ATTACHMENT_MODE_SHARED: SHARED } = pb.AttachmentMode;

const oldRecord = (domainId: string, diskId: string, host: string, mode: 'exclusive' | 'shared') =>
  JSON.stringify({ domainId, diskId, attachments: [{ host, mode, readonly: false, createMs: Date.now(), leafVolumeId: FAKE_LEAF, generation: 3 }] });

describe('attachment records: the one-time upgrade on nats-server', () => {
  const dir = makeTestDir('attachment-upgrade');
  const nats = new NatsServer(dir);
  const conns: NatsConnection[] = [];
  const replicas: { att: DiskAttachments; kv: CountingKv; metrics: SchedulerMetrics }[] = [];
  let olderRelease: KV;

  const connectKv = async () => {
    const nc = await connect(nats.connectOptions('scheduler'));
    conns.push(nc);
    return openKv(nc, BUCKET);
  };
  const replica = async () => {
    const kv = new CountingKv(new NatsKvStore(await connectKv()));
    const metrics = new SchedulerMetrics(new Registry());
    const log = createLogger('attachment-upgrade-test', 'silent', 'test');
    const att = new DiskAttachments({ kv, cluster: fakeAttachmentCluster().cluster, events: { publish: () => undefined } as never, log, metrics });
    const r = { att, kv, metrics };
    replicas.push(r);
    return r;
  };
  const sum = async (get: (m: SchedulerMetrics) => Promise<number>) => (await Promise.all(replicas.map((r) => get(r.metrics)))).reduce((a, b) => a + b, 0);
  const outcome = (name: string) => async (m: SchedulerMetrics) =>
    (await m.attachmentLegacyRecords.get()).values.find((v) => v.labels.outcome === name)?.value ?? 0;
  const legacyReads = async (m: SchedulerMetrics) => (await m.attachmentLegacyReads.get()).values[0]?.value ?? 0;
  const oldKeyReads = (disks: string[]) => replicas.reduce((n, r) => n + disks.reduce((k, d) => k + r.kv.readsOf(`disk.${d}`), 0), 0);
  const hostsOn = async (r: { att: DiskAttachments }, domainId: string, diskId: string) =>
    (await r.att.list({ storageDomainId: domainId, diskId, host: '' })).attachments.map((a) => a.host);

  beforeAll(async () => {
    await nats.start();
    olderRelease = await connectKv();
  }, 30_000);
  afterAll(async () => {
    replicas.forEach((r) => r.att.stop());
    await Promise.all(conns.map((c) => c.close()));
    await nats.stop();
    removeTestDir(dir);
  });

  it('three replicas migrate every old record once; calls then read no old key; a record an older replica writes later is moved, not lost', async () => {
    // What a scheduler of the older release left: 12 disks, shared in one domain, exclusive in the other.
    const disks = Array.from({ length: 12 }, () => randomUUID());
    for (const [i, d] of disks.entries()) await olderRelease.create(`disk.${d}`, oldRecord(DOMAINS[i % 2]!, d, 'h1', i % 2 ? 'exclusive' : 'shared'));
    const [a, b, c] = [await replica(), await replica(), await replica()];
    await Promise.all([a.att.start(), b.att.start(), c.att.start()]);
    await waitFor('every replica upgraded', () => (replicas.every((r) => r.att.upgradeDone) ? true : undefined), 60_000, 20);

    expect(JSON.parse((await olderRelease.get(FORMAT_MARKER_KEY))!.string())).toMatchObject({ version: 2 });
    for (const [i, d] of disks.entries()) {
      expect((await olderRelease.get(`disk.${d}`))?.operation ?? 'none').not.toBe('PUT');
      expect(JSON.parse((await olderRelease.get(`disk.${DOMAINS[i % 2]}.${d}`))!.string())).toMatchObject({ version: 2, attachments: [{ host: 'h1' }] });
    }
    expect(await sum(outcome('migrated'))).toBe(disks.length); // once each, whichever replica did it
    expect(await sum(outcome('refused'))).toBe(0);

    // Calls on every replica: the migrated records rule, and not one read of an old key.
    const readsBefore = await sum(legacyReads);
    replicas.forEach((r) => r.kv.reads.clear());
    for (const [i, d] of disks.entries()) {
      const r = replicas[i % 3]!;
      expect(await hostsOn(r, DOMAINS[i % 2]!, d)).toEqual(['h1']);
      const publish = (host: string, mode: pb.AttachmentMode) =>
        r.att.publish({ storageDomainId: DOMAINS[i % 2]!, diskId: d, host, mode, readonly: false }, {});
      await expect(publish('h2', EXCLUSIVE)).rejects.toMatchObject({ reason: 'ATTACHED_TO_ANOTHER_HOST' });
      if (i % 2 === 0) await publish('h2', SHARED);
    }
    await a.att.unpublish({ storageDomainId: DOMAINS[0]!, diskId: disks[0]!, host: 'h1' }, {});
    expect(await hostsOn(c, DOMAINS[0]!, disks[0]!)).toEqual(['h2']);
    expect(oldKeyReads(disks)).toBe(0);
    expect(replicas.reduce((n, r) => n + r.kv.readsOf(`disk.${DOMAINS[0]}.${disks[0]}`), 0)).toBeGreaterThan(0);
    expect(await sum(legacyReads)).toBe(readsBefore);

    // Rolling upgrade: a replica of the older release, still running, publishes a disk the old way.
    const late = randomUUID();
    await olderRelease.create(`disk.${late}`, oldRecord(DOMAINS[1]!, late, 'h3', 'exclusive'));
    await waitFor('moved to its new key', async () => ((await olderRelease.get(`disk.${DOMAINS[1]}.${late}`)) ? true : undefined), 30_000, 20);
    await waitFor(
      'the old key deleted',
      async () => (((await olderRelease.get(`disk.${late}`))?.operation ?? 'none') !== 'PUT' ? true : undefined),
      30_000,
      20,
    );
    await waitFor(
      'every replica saw it',
      async () => ((await Promise.all(replicas.map((r) => outcome('after_upgrade')(r.metrics)))).every((n) => n === 1) ? true : undefined),
      30_000,
      20,
    );
    expect(await sum(outcome('migrated'))).toBe(disks.length + 1);
    for (const r of replicas) expect(await hostsOn(r, DOMAINS[1]!, late)).toEqual(['h3']);
  });
});
