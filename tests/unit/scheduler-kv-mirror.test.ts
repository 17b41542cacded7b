import { DomainRegistry } from '../../services/scheduler/src/domains';
import { KvMirror } from '../../services/scheduler/src/kv-mirror';
import { MemoryKvStore } from '../../services/scheduler/src/kv-store';
import { silentLog } from '../harness/scheduler-engine';

async function until(pred: () => boolean): Promise<void> {
  for (let i = 0; !pred(); i++) {
    if (i > 250) throw new Error('timeout');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('KvMirror (what a replica polls, followed by one KV watch)', () => {
  test('reads the prefix once, then follows writes and deletes; other prefixes stay out', async () => {
    const kv = new MemoryKvStore();
    await kv.create('host.a', '1');
    await kv.create('hostid.1', 'a');
    const mirror = new KvMirror(kv, 'host', silentLog);
    expect(mirror.values()).toBeUndefined(); // nothing known before the first read: callers keep what they have
    mirror.start();
    await until(() => mirror.values() !== undefined);
    expect([...mirror.values()!]).toEqual([['host.a', '1']]);
    const rev = (await kv.get('host.a'))!.revision;
    await kv.update('host.a', '2', rev);
    await kv.create('host.b', '3');
    await kv.delete('host.a');
    expect([...mirror.values()!]).toEqual([['host.b', '3']]);
    mirror.stop();
  });

  test("this replica's own write shows at once; its delete is not undone by an older write the watch delivers late", async () => {
    const kv = new MemoryKvStore();
    const mirror = new KvMirror(kv, 'maintenance', silentLog);
    mirror.start();
    await until(() => mirror.values() !== undefined);
    mirror.noteWrite('maintenance.h1', 'in', 7);
    expect(mirror.values()!.get('maintenance.h1')).toBe('in');
    mirror.noteDelete('maintenance.h1', 7);
    // The watch now brings the write of revision 7 (late): the key stays deleted.
    (mirror as unknown as { apply(m: Map<string, unknown>, c: { key: string; revision: number; value?: string }): void }).apply(
      (mirror as unknown as { entries: Map<string, unknown> }).entries,
      { key: 'maintenance.h1', revision: 7, value: 'in' },
    );
    expect(mirror.values()!.has('maintenance.h1')).toBe(false);
    mirror.stop();
  });

  test('the host poll reads the domain registry from its watches: registered, deactivated and removed domains', async () => {
    const kv = new MemoryKvStore();
    const domains = new DomainRegistry(kv);
    const entry = (id: string, createTimeMs: number) => ({ id, name: id, path: `/s/${id}`, warningFreePercent: 10, criticalFreeBytes: 0, createTimeMs });
    await domains.put(entry('a', 1));
    const before = await domains.polled(); // not following yet: from KV
    expect(before.domains.map((d) => d.id)).toEqual(['a']);
    domains.follow(silentLog);
    await domains.put(entry('b', 2));
    await domains.update('a', (e) => ({ ...e, maintenance: true, epochMs: 5 }));
    await domains.removeLeavingRecord({ ...entry('c', 3), epochMs: 7 });
    // Once the watches have read KV, a poll makes no KV listing.
    const keys = jest.spyOn(kv, 'keys');
    let polled = await domains.polled();
    for (let i = 0; keys.mock.calls.length; i++) {
      if (i > 100) throw new Error('the registry is still read from KV');
      await new Promise((r) => setTimeout(r, 20));
      keys.mockClear();
      polled = await domains.polled();
    }
    expect(polled.domains.map((d) => [d.id, !!d.maintenance])).toEqual([
      ['a', true],
      ['b', false],
    ]);
    expect(polled.leaveOrders).toEqual([
      { id: 'a', epochMs: 5 },
      { id: 'c', epochMs: 7 },
    ]);
    domains.stopFollowing();
  });
});
