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
});
