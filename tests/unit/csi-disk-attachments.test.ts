import { pb, Reason, SdmeshError } from '@sdmesh/common';
import { DiskAttachments, parseStoredDisk } from '../../services/scheduler/src/attachments';
import { MemoryKvStore, type KvStore } from '../../services/scheduler/src/kv-store';
import { SchedulerMetrics } from '../../services/scheduler/src/metrics';
import { Registry } from 'prom-client';
import { FAKE_LEAF, fakeAttachmentCluster } from '../harness/attachment-fakes';
import { CountingKv } from '../harness/counting-kv';

/** The scheduler's attach records on an in-memory KV, with a fake cluster (hosts, one disk per domain). */
const DOMAIN = '0b4c3e2a-1111-4222-8333-444455556666';
const OTHER_DOMAIN = '1c5d4f3b-2222-4333-8444-555566667777';
const DISK = '7f00aa11-2222-4333-8444-555566667777';
const LEAF = FAKE_LEAF;
const { ATTACHMENT_MODE_EXCLUSIVE: EXCLUSIVE, ATTACHMENT_MODE_SHARED: SHARED } = pb.AttachmentMode;
const { KIND_PUBLISHED, KIND_UNPUBLISHED, KIND_FENCED } = pb.DiskAttachmentEvent_Kind;

function setup(wrap: (kv: MemoryKvStore) => KvStore = (kv) => kv) {
  const { cluster, leaf, hosts, bumps, lease } = fakeAttachmentCluster();
  const events: pb.DiskAttachmentEvent[] = [];
  const publisher = { publish: (p: { diskAttachment: pb.DiskAttachmentEvent }) => events.push(p.diskAttachment) };
  const logged: string[] = [];
  const log = { info: () => undefined, warn: (_o: unknown, msg: string) => logged.push(msg), error: (_o: unknown, msg: string) => logged.push(msg) } as never;
  const metrics = new SchedulerMetrics(new Registry());
  const kv = new MemoryKvStore();
  const deps = { kv: wrap(kv), cluster, events: publisher as never, log, metrics, upgradeRetryMs: 10 };
  const att = new DiskAttachments(deps);
  const publish = (host: string, mode = EXCLUSIVE, readonly = false, domain = DOMAIN) =>
    att.publish({ storageDomainId: domain, diskId: DISK, host, mode, readonly }, {});
  const unpublish = (host = '', domain = DOMAIN) => att.unpublish({ storageDomainId: domain, diskId: DISK, host }, {});
  const refusal = async (p: Promise<unknown>) => p.then(() => 'OK').catch((e: SdmeshError) => e.reason);
  const changes = async () => Object.fromEntries((await metrics.attachmentChanges.get()).values.map((v) => [v.labels.change, v.value]));
  const hostsOf = async (domain = DOMAIN) => (await att.list({ storageDomainId: domain, diskId: DISK, host: '' })).attachments.map((a) => a.host);
  const dies = (host: string) => {
    hosts.get(host)!.healthy = false;
    hosts.get(host)!.liveness.set(DOMAIN, pb.HostLiveness.HOST_LIVENESS_DEAD);
  };
  return { att, kv, deps, metrics, logged, hosts, bumps, lease, events, leaf, publish, unpublish, refusal, changes, hostsOf, dies };
}

/** A record as written before version 2: keyed by the disk id alone, no version field. */
const legacyRecord = (domainId: string, hosts: string[], mode = 'shared', diskId = DISK) =>
  JSON.stringify({
    domainId,
    diskId,
    attachments: hosts.map((host) => ({ host, mode, readonly: false, createMs: 1_700_000_000_000, leafVolumeId: LEAF, generation: 3 })),
  });

describe('disk attachments (scheduler)', () => {
  it('lets exactly one of two racing exclusive publishes win', async () => {
    const { publish, refusal, att } = setup();
    const results = await Promise.all([refusal(publish('h1')), refusal(publish('h2'))]);
    expect(results.sort()).toEqual(['ATTACHED_TO_ANOTHER_HOST', 'OK']);
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments).toHaveLength(1);
  });

  it('is idempotent per host, refuses another mode there, and shares only among shared attachments', async () => {
    const { publish, refusal, att, hostsOf } = setup();
    const first = await publish('h1', SHARED);
    expect(first).toMatchObject({ host: 'h1', mode: SHARED, leafVolumeId: LEAF, generation: 3 });
    expect(await publish('h1', SHARED)).toEqual(first);
    expect(await refusal(publish('h1', SHARED, true))).toBe('ATTACHMENT_MISMATCH');
    expect(await refusal(publish('h2', SHARED))).toBe('OK');
    expect(await refusal(publish('h3', EXCLUSIVE))).toBe('ATTACHED_TO_ANOTHER_HOST');
    expect(await refusal(publish('nobody'))).toBe('HOST_NOT_FOUND');
    expect(await refusal(att.publish({ storageDomainId: DOMAIN, diskId: DISK, host: 'h3', mode: 0, readonly: false }, {}))).toBe('INVALID_ATTACHMENT_MODE');
    expect(await hostsOf()).toEqual(['h1', 'h2']);
  });

  it('unpublishes a host that does not answer only once sanlock calls it dead, bumping the generation', async () => {
    const { publish, unpublish, refusal, hosts, bumps, events, att, changes } = setup();
    await publish('h2');
    hosts.get('h2')!.healthy = false;
    for (const l of [undefined, pb.HostLiveness.HOST_LIVENESS_LIVE, pb.HostLiveness.HOST_LIVENESS_FAILING]) {
      if (l !== undefined) hosts.get('h2')!.liveness.set(DOMAIN, l);
      expect(await refusal(unpublish('h2'))).toBe('HOST_NOT_DEAD');
    }
    expect(bumps).toEqual([]);
    hosts.get('h2')!.liveness.set(DOMAIN, pb.HostLiveness.HOST_LIVENESS_DEAD);
    expect(await unpublish('h2')).toEqual({ hosts: ['h2'], fencedGeneration: 4 });
    expect(bumps).toEqual([expect.objectContaining({ volumeId: LEAF, generation: 3, bumpGeneration: true })]);
    expect(events.map((e) => e.kind)).toEqual([KIND_PUBLISHED, KIND_FENCED]);
    expect(await unpublish('h2')).toEqual({ hosts: [], fencedGeneration: 0 });
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments).toEqual([]);
    expect((await publish('h1')).generation).toBe(4);
    expect(await changes()).toEqual({ published: 2, unpublished: 0, fenced: 1, dead_shared: 0, refused_not_dead: 3 });
  });

  it('a dead host whose exclusive attachment still holds the lease: HOST_NOT_DEAD until the bump gets it, then fenced', async () => {
    const { publish, unpublish, refusal, lease, dies, hostsOf } = setup();
    await publish('h1');
    dies('h1');
    lease.held = true;
    expect(await refusal(unpublish('h1'))).toBe('HOST_NOT_DEAD');
    expect(await hostsOf()).toEqual(['h1']);
    lease.held = false;
    expect(await unpublish('h1')).toEqual({ hosts: ['h1'], fencedGeneration: 4 });
  });

  it("removes a dead host's shared attachment while a live host keeps its own; the bump is paid before the next lone publish", async () => {
    const { publish, unpublish, refusal, bumps, lease, events, dies, hostsOf, changes, kv, hosts } = setup();
    const ctxA = await publish('h1', SHARED);
    const ctxB = await publish('h2', SHARED);
    dies('h1');
    // h2's storage daemon holds the leaf shared: a bump (exclusive) could not run, and must not.
    lease.held = true;
    expect(await unpublish('h1')).toEqual({ hosts: ['h1'], fencedGeneration: 0 });
    expect(bumps).toEqual([]);
    expect(await hostsOf()).toEqual(['h2']);
    expect(await publish('h2', SHARED)).toEqual(ctxB); // h2 keeps its attachment, at its generation
    // Asked again while h2 itself does not answer (the debt is then owed with no live host on the disk): the same answer, no bump.
    hosts.get('h2')!.healthy = false;
    expect(await publish('h2', SHARED)).toEqual(ctxB);
    hosts.get('h2')!.healthy = true;
    expect(events.slice(2).map((e) => [e.host, e.kind, e.generation])).toEqual([['h1', KIND_UNPUBLISHED, ctxA.generation]]);
    expect(await changes()).toMatchObject({ dead_shared: 1, fenced: 0 });
    // Another writer may still join h2 at the same generation; an exclusive one may not.
    expect((await publish('h3', SHARED)).generation).toBe(3);
    expect(await refusal(publish('h1', EXCLUSIVE))).toBe('ATTACHED_TO_ANOTHER_HOST');
    await unpublish('h3');
    await unpublish('h2');
    expect(await hostsOf()).toEqual([]);
    expect(JSON.parse(kv.data.get(`disk.${DOMAIN}.${DISK}`)!.value)).toMatchObject({ attachments: [], unfencedGeneration: 3 });
    // Nobody is published, but someone still leases the leaf: the owed bump cannot run, nothing is recorded.
    expect(await refusal(publish('h3', EXCLUSIVE))).toBe('FENCE_PENDING');
    expect(await hostsOf()).toEqual([]);
    lease.held = false;
    const next = await publish('h3', EXCLUSIVE);
    expect(next.generation).toBe(4);
    expect(bumps).toHaveLength(1);
    expect(JSON.parse(kv.data.get(`disk.${DOMAIN}.${DISK}`)!.value).unfencedGeneration).toBeUndefined();
    // Paid once: the next lone publish bumps nothing.
    await unpublish('h3');
    expect((await publish('h2', SHARED)).generation).toBe(4);
    expect(bumps).toHaveLength(1);
    await unpublish('h2');
    expect(kv.data.size).toBe(0);
  });

  it('a publish while a dead host is being fenced pays the bump first instead of recording the generation the dead host had', async () => {
    const { publish, unpublish, refusal, bumps, lease, dies, hostsOf } = setup();
    await publish('h1', SHARED);
    dies('h1');
    lease.held = true; // the bump cannot run yet: its unpublish stops after marking it owed
    expect(await refusal(unpublish('h1'))).toBe('HOST_NOT_DEAD');
    expect(await hostsOf()).toEqual(['h1']);
    // No host that answers is on the disk: joining it at generation 3 would give h2 a context the bump then makes stale.
    expect(await refusal(publish('h2', SHARED))).toBe('FENCE_PENDING');
    expect(await hostsOf()).toEqual(['h1']);
    lease.held = false;
    expect((await publish('h2', SHARED)).generation).toBe(4);
    expect(await unpublish('h1')).toEqual({ hosts: ['h1'], fencedGeneration: 0 });
    expect(await hostsOf()).toEqual(['h2']);
    expect((await publish('h2', SHARED)).generation).toBe(4);
    await unpublish('h2');
    expect((await publish('h3')).generation).toBe(4);
    expect(bumps).toHaveLength(1);
  });

  it('with every shared host dead, the last one removed pays the bump once', async () => {
    const { publish, unpublish, bumps, dies, kv } = setup();
    await publish('h1', SHARED);
    await publish('h2', SHARED);
    dies('h1');
    dies('h2');
    expect(await unpublish('h1')).toEqual({ hosts: ['h1'], fencedGeneration: 0 });
    expect(await unpublish('h2')).toEqual({ hosts: ['h2'], fencedGeneration: 4 });
    expect(bumps).toHaveLength(1);
    expect(kv.data.size).toBe(0);
    expect((await publish('h3')).generation).toBe(4);
  });

  it('fences only the dead host of an unpublish of several: the one that answers goes first, plainly', async () => {
    const { publish, unpublish, events, changes, dies, bumps } = setup();
    await publish('h1', SHARED);
    await publish('h2', SHARED);
    dies('h1');
    expect(await unpublish()).toEqual({ hosts: ['h1', 'h2'], fencedGeneration: 4 });
    expect(events.slice(2).map((e) => [e.host, e.kind, e.generation])).toEqual([
      ['h2', KIND_UNPUBLISHED, 3],
      ['h1', KIND_FENCED, 4],
    ]);
    expect(bumps).toHaveLength(1);
    expect(await changes()).toMatchObject({ published: 2, unpublished: 1, fenced: 1 });
  });

  it('keys records by domain and disk: the same disk id in two domains (a moved disk) has two independent records', async () => {
    const { publish, unpublish, refusal, hostsOf, att } = setup();
    await publish('h1', EXCLUSIVE, false, DOMAIN);
    expect(await refusal(publish('h2', EXCLUSIVE, false, OTHER_DOMAIN))).toBe('OK');
    expect(await hostsOf(DOMAIN)).toEqual(['h1']);
    expect(await hostsOf(OTHER_DOMAIN)).toEqual(['h2']);
    expect(await unpublish('h1', OTHER_DOMAIN)).toEqual({ hosts: [], fencedGeneration: 0 });
    expect(await hostsOf(DOMAIN)).toEqual(['h1']);
    const all = (await att.list({ storageDomainId: '', diskId: DISK, host: '' })).attachments;
    expect(all.map((a) => [a.storageDomainId, a.host])).toEqual([
      [DOMAIN, 'h1'],
      [OTHER_DOMAIN, 'h2'],
    ]);
  });

  it('reads records of the old format (keyed by disk id) for the domain they name and moves them to the new key on their next change', async () => {
    const { publish, unpublish, refusal, hostsOf, kv, att, dies, bumps } = setup();
    await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
    expect(await hostsOf()).toEqual(['h1']);
    expect((await att.list({ storageDomainId: '', diskId: '', host: 'h1' })).attachments.map((a) => a.diskId)).toEqual([DISK]);
    // The old record counts in its own domain only.
    expect(await hostsOf(OTHER_DOMAIN)).toEqual([]);
    expect(await refusal(publish('h2', EXCLUSIVE, false, OTHER_DOMAIN))).toBe('OK');
    expect(kv.data.has(`disk.${DISK}`)).toBe(true);
    // Its rules hold before the move: shared, so an exclusive publish is refused; a shared one joins and migrates it.
    expect(await refusal(publish('h3', EXCLUSIVE))).toBe('ATTACHED_TO_ANOTHER_HOST');
    await publish('h3', SHARED);
    expect(kv.data.has(`disk.${DISK}`)).toBe(false);
    expect(JSON.parse(kv.data.get(`disk.${DOMAIN}.${DISK}`)!.value)).toMatchObject({ version: 2, domainId: DOMAIN, diskId: DISK });
    expect(await hostsOf()).toEqual(['h1', 'h3']);
    // The dead-host rule on a migrated record: h1 dead goes without a bump while h3 keeps it.
    dies('h1');
    await unpublish('h1');
    expect(await hostsOf()).toEqual(['h3']);
    expect(bumps).toEqual([]);
  });

  it('a leftover of the old format beside its migrated record is not listed twice and goes at the next change', async () => {
    const { publish, hostsOf, kv, att } = setup();
    await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
    await publish('h2', SHARED);
    // As if the migration's delete had not happened (a crash between its two writes).
    await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments.map((a) => a.host)).toEqual(['h1', 'h2']);
    expect(await hostsOf()).toEqual(['h1', 'h2']);
    await publish('h2', SHARED); // no change of the record, still a cleanup
    expect(kv.data.has(`disk.${DISK}`)).toBe(false);
  });

  it('refuses to act on an unreadable record (INTERNAL ATTACHMENT_RECORD_INVALID) and changes nothing; a listing of all leaves it out', async () => {
    const { publish, unpublish, refusal, kv, att } = setup();
    const key = `disk.${DOMAIN}.${DISK}`;
    await kv.create(key, '{"version":2,"domainId":"' + DOMAIN + '","diskId":"' + DISK + '","attachments":[{"host":"h1","mode":"owner"}]}');
    const before = kv.data.get(key)!;
    expect(await refusal(publish('h2', SHARED))).toBe('ATTACHMENT_RECORD_INVALID');
    expect(await refusal(unpublish('h1'))).toBe('ATTACHMENT_RECORD_INVALID');
    expect(await refusal(att.list({ storageDomainId: '', diskId: DISK, host: '' }))).toBe('ATTACHMENT_RECORD_INVALID');
    const err = await att.list({ storageDomainId: DOMAIN, diskId: DISK, host: '' }).catch((e: SdmeshError) => e);
    expect((err as SdmeshError).message).toContain(key);
    expect((err as SdmeshError).code).toBe(13); // INTERNAL
    expect((await att.list({ storageDomainId: '', diskId: '', host: '' })).attachments).toEqual([]);
    expect(kv.data.get(key)).toEqual(before);
  });

  it('validates every field of a stored record', () => {
    const good = {
      version: 2,
      domainId: DOMAIN,
      diskId: DISK,
      attachments: [{ host: 'h1', mode: 'shared', readonly: false, createMs: 1, leafVolumeId: LEAF, generation: 3 }],
    };
    const parse = (v: unknown, expect_: { domainId?: string; diskId: string } = { domainId: DOMAIN, diskId: DISK }) =>
      parseStoredDisk('k', typeof v === 'string' ? v : JSON.stringify(v), expect_);
    expect(parse(good)).toMatchObject({ version: 2, attachments: [{ host: 'h1', generation: 3 }] });
    expect(parse({ ...good, version: undefined }, { diskId: DISK })).toMatchObject({ domainId: DOMAIN }); // legacy
    const att0 = good.attachments[0]!;
    for (const bad of [
      'not json',
      '[]',
      'null',
      { ...good, version: 3 },
      { ...good, version: undefined },
      { ...good, domainId: 'x' },
      { ...good, domainId: OTHER_DOMAIN },
      { ...good, diskId: LEAF },
      { ...good, attachments: {} },
      { ...good, attachments: [null] },
      { ...good, attachments: [{ ...att0, host: '' }] },
      { ...good, attachments: [{ ...att0, host: 'x'.repeat(254) }] },
      { ...good, attachments: [{ ...att0, mode: 'owner' }] },
      { ...good, attachments: [{ ...att0, readonly: 'no' }] },
      { ...good, attachments: [{ ...att0, createMs: -1 }] },
      { ...good, attachments: [{ ...att0, leafVolumeId: '../x' }] },
      { ...good, attachments: [{ ...att0, generation: 1.5 }] },
      { ...good, attachments: [{ ...att0, generation: -1 }] },
      { ...good, attachments: [att0, att0] },
      {
        ...good,
        attachments: [
          { ...att0, mode: 'exclusive' },
          { ...att0, host: 'h2' },
        ],
      },
      { ...good, unfencedGeneration: 'x' },
    ]) {
      expect(() => parse(bad)).toThrow(expect.objectContaining({ reason: Reason.ATTACHMENT_RECORD_INVALID }));
    }
    // A legacy record must not carry a version; another disk's record under this key is refused.
    expect(() => parse(good, { diskId: DISK })).toThrow(expect.objectContaining({ reason: Reason.ATTACHMENT_RECORD_INVALID }));
    expect(() => parse({ ...good, version: undefined, diskId: LEAF }, { diskId: DISK })).toThrow(
      expect.objectContaining({ reason: Reason.ATTACHMENT_RECORD_INVALID }),
    );
  });
});

describe('the one-time upgrade of old-format attachment records', () => {
  const DISK2 = '8e11bb22-3333-4444-8555-666677778888';
  const DISK3 = '9f22cc33-4444-4555-8666-777788889999';
  const count = () => {
    let counting!: CountingKv;
    return { wrap: (kv: MemoryKvStore) => (counting = new CountingKv(kv)), counting: () => counting };
  };
  const outcomes = async (metrics: SchedulerMetrics) =>
    Object.fromEntries((await metrics.attachmentLegacyRecords.get()).values.map((v) => [v.labels.outcome, v.value]));
  const legacyReads = async (metrics: SchedulerMetrics) => (await metrics.attachmentLegacyReads.get()).values[0]?.value ?? 0;
  /** Polls until `done` (the watch's migrations run after the write that triggered them). */
  async function until(done: () => boolean): Promise<void> {
    for (let i = 0; !done(); i++) {
      if (i > 2000) throw new Error('never happened');
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  it('replicas starting at once migrate each old record once, write the marker, and calls then never read the old key', async () => {
    const c = count();
    const { att, kv, deps, metrics, hostsOf, publish, refusal, unpublish } = setup(c.wrap);
    await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
    await kv.create(`disk.${DISK2}`, legacyRecord(OTHER_DOMAIN, ['h2'], 'exclusive', DISK2));
    // Before the upgrade, every call reads the old key too (migration on read).
    expect(await hostsOf()).toEqual(['h1']);
    expect(c.counting().readsOf(`disk.${DISK}`)).toBe(1);
    const others = [new DiskAttachments(deps), new DiskAttachments(deps)];
    await Promise.all([att.start(), ...others.map((o) => o.start())]);
    try {
      // Each is done at its first attempt, or at a retry when it looked while another was mid-move.
      await until(() => [att, ...others].every((a) => a.upgradeDone));
      expect([...kv.data.keys()].sort()).toEqual([`disk.${DOMAIN}.${DISK}`, `disk.${OTHER_DOMAIN}.${DISK2}`, 'format'].sort());
      expect(JSON.parse(kv.data.get('format')!.value)).toMatchObject({ version: 2 });
      expect(JSON.parse(kv.data.get(`disk.${OTHER_DOMAIN}.${DISK2}`)!.value)).toMatchObject({ version: 2, attachments: [{ host: 'h2', mode: 'exclusive' }] });
      expect(await outcomes(metrics)).toEqual({ migrated: 2, after_upgrade: 0, refused: 0 }); // once each, across the three replicas
      expect(await metrics.attachmentUpgradeDone.get()).toMatchObject({ values: [{ value: 1 }] });

      // Every kind of call, on every replica: not one read of an old key; the migrated records rule.
      const readsBefore = await legacyReads(metrics);
      c.counting().reads.clear();
      expect(await hostsOf()).toEqual(['h1']);
      expect(await refusal(publish('h3'))).toBe('ATTACHED_TO_ANOTHER_HOST');
      await publish('h3', SHARED);
      await unpublish('h3');
      expect(await refusal(others[0]!.publish({ storageDomainId: OTHER_DOMAIN, diskId: DISK2, host: 'h1', mode: SHARED, readonly: false }, {}))).toBe(
        'ATTACHED_TO_ANOTHER_HOST',
      );
      await others[1]!.unpublish({ storageDomainId: OTHER_DOMAIN, diskId: DISK2, host: 'h2' }, {});
      expect(c.counting().readsOf(`disk.${DISK}`) + c.counting().readsOf(`disk.${DISK2}`)).toBe(0);
      expect(c.counting().readsOf(`disk.${DOMAIN}.${DISK}`)).toBeGreaterThan(0);
      expect(await legacyReads(metrics)).toBe(readsBefore);
    } finally {
      [att, ...others].forEach((a) => a.stop());
    }
  });

  it('an old record it cannot read keeps the marker out (calls keep reading old keys and refuse that disk) until it is repaired', async () => {
    const c = count();
    const { att, kv, metrics, refusal, publish, logged } = setup(c.wrap);
    await kv.create(`disk.${DISK}`, '{"domainId":"not-a-uuid"}');
    await kv.create(`disk.${DISK2}`, legacyRecord(DOMAIN, ['h1'], 'shared', DISK2));
    await att.start();
    try {
      expect(att.upgradeDone).toBe(false);
      expect(kv.data.has('format')).toBe(false);
      expect(kv.data.has(`disk.${DISK2}`)).toBe(false); // the readable one is migrated
      expect(await outcomes(metrics)).toMatchObject({ migrated: 1, refused: 1 });
      expect(logged).toContain('attachment record of the old format not migrated: left for an operator');
      expect(await refusal(publish('h2'))).toBe('ATTACHMENT_RECORD_INVALID');
      expect(c.counting().readsOf(`disk.${DISK}`)).toBeGreaterThan(0);
      // The operator removes it: the next attempt writes the marker.
      await kv.delete(`disk.${DISK}`);
      await until(() => att.upgradeDone);
      expect(kv.data.has('format')).toBe(true);
      expect(await refusal(publish('h2'))).toBe('OK');
    } finally {
      att.stop();
    }
  });

  it('an old record written after the upgrade (an older replica) is moved at once, or refused when newer than the new record', async () => {
    const { att, kv, metrics, refusal, hostsOf, logged } = setup();
    await att.start();
    try {
      expect(att.upgradeDone).toBe(true);
      // No new-format record for the disk: it becomes one, nothing lost.
      await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
      await until(() => !kv.data.has(`disk.${DISK}`));
      expect(JSON.parse(kv.data.get(`disk.${DOMAIN}.${DISK}`)!.value)).toMatchObject({ attachments: [{ host: 'h1' }] });
      expect(await hostsOf()).toEqual(['h1']);
      expect(logged.some((m) => m.startsWith('an attachment record of the old format was written after the upgrade'))).toBe(true);
      // Written after the disk's new-format record: neither is dropped; calls about it are refused.
      const disk3 = (host: string) => att.publish({ storageDomainId: DOMAIN, diskId: DISK3, host, mode: EXCLUSIVE, readonly: false }, {});
      await disk3('h2');
      await kv.create(`disk.${DISK3}`, legacyRecord(DOMAIN, ['h3'], 'exclusive', DISK3));
      await until(() => logged.includes('attachment record of the old format not migrated: left for an operator'));
      expect(await refusal(disk3('h2'))).toBe('ATTACHMENT_RECORD_INVALID');
      expect(kv.data.has(`disk.${DISK3}`)).toBe(true);
      expect(JSON.parse(kv.data.get(`disk.${DOMAIN}.${DISK3}`)!.value)).toMatchObject({ attachments: [{ host: 'h2' }] });
      expect(await outcomes(metrics)).toEqual({ migrated: 1, after_upgrade: 2, refused: 1 });
      // The operator removes the wrong one: the disk is served again, from its new record.
      await kv.delete(`disk.${DISK3}`);
      expect(await refusal(disk3('h2'))).toBe('OK');
    } finally {
      att.stop();
    }
  });

  it('a marker it does not understand is left alone, and calls keep reading old keys', async () => {
    const c = count();
    const { att, kv, hostsOf } = setup(c.wrap);
    await kv.create('format', '{"version":3}');
    await kv.create(`disk.${DISK}`, legacyRecord(DOMAIN, ['h1']));
    await att.start();
    try {
      expect(att.upgradeDone).toBe(false);
      expect(kv.data.get('format')!.value).toBe('{"version":3}');
      expect(await hostsOf()).toEqual(['h1']);
      expect(c.counting().readsOf(`disk.${DISK}`)).toBeGreaterThan(0);
    } finally {
      att.stop();
    }
  });
});
