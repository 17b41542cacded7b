import { isJetStreamNotReady, type KV } from '@sdmesh/common';
import { KvConflict, NatsKvStore } from '../../services/scheduler/src/kv-store';

/**
 * The scheduler's KV calls across a NATS node's death: "no responders" (no stream leader yet)
 * and timeouts are waited out; a write that timed out but landed is recognised as this
 * writer's own, while a real conflict stays a conflict.
 */
describe('NatsKvStore while JetStream is briefly unavailable', () => {
  const noResponders = () => Object.assign(new Error('jetstream is not enabled: no responders'), { name: 'JetStreamNotEnabled' });
  const timeout = () => Object.assign(new Error('timeout'), { name: 'TimeoutError' });
  const conflict = () => new Error('wrong last sequence: 7');
  const entry = (value: string, revision: number) => ({ operation: 'PUT', length: value.length, revision, string: () => value });

  /** A KV whose calls fail as scripted (one failure per call), then do what `ok` says. */
  function fakeKv(script: { failures: Array<() => Error>; ok: (...args: unknown[]) => unknown; stored?: { value: string; revision: number } }) {
    const calls: string[] = [];
    const call =
      (name: string) =>
      async (...args: unknown[]) => {
        calls.push(name);
        const fail = script.failures.shift();
        if (fail) throw fail();
        return script.ok(...args);
      };
    const kv = {
      create: call('create'),
      update: call('update'),
      get: async () => (script.stored ? entry(script.stored.value, script.stored.revision) : null),
    };
    return { kv: kv as unknown as KV, calls };
  }

  it('retries a write that found no stream leader, and returns its revision', async () => {
    const { kv, calls } = fakeKv({ failures: [noResponders, noResponders], ok: () => 12 });
    await expect(new NatsKvStore(kv).update('op.1', 'v2', 11)).resolves.toBe(12);
    expect(calls).toEqual(['update', 'update', 'update']);
  });

  it('a create that timed out but landed is its own write, not a conflict', async () => {
    const { kv } = fakeKv({ failures: [timeout, conflict], ok: () => 0, stored: { value: 'mine', revision: 5 } });
    await expect(new NatsKvStore(kv).create('lock.a', 'mine')).resolves.toBe(5);
  });

  it('a conflict with another value stays a conflict (after a timeout too), and so does a first-try conflict', async () => {
    const other = fakeKv({ failures: [timeout, conflict], ok: () => 0, stored: { value: 'theirs', revision: 5 } });
    await expect(new NatsKvStore(other.kv).create('lock.a', 'mine')).rejects.toBeInstanceOf(KvConflict);
    // Without a timeout before it, an equal value is not taken for this writer's own.
    const plain = fakeKv({ failures: [conflict], ok: () => 0, stored: { value: 'mine', revision: 5 } });
    await expect(new NatsKvStore(plain.kv).create('lock.a', 'mine')).rejects.toBeInstanceOf(KvConflict);
  });

  it('other errors are not retried', async () => {
    const { kv, calls } = fakeKv({ failures: [() => new Error('permissions violation')], ok: () => 1 });
    await expect(new NatsKvStore(kv).update('op.1', 'v', 1)).rejects.toThrow(/permissions violation/);
    expect(calls).toEqual(['update']);
  });
});

/** What counts as "JetStream not ready yet" when buckets and streams are set up at start. */
describe('isJetStreamNotReady', () => {
  test.each([
    ['jetstream is not enabled: no responders', true],
    ['timeout', true],
    ['insufficient resources', true],
    // A 3-node cluster whose metadata leader does not know its peers yet, asked for an R3 bucket (a CI flake of scheduler-kv.test.ts)
    ['no suitable peers for placement', true],
    ['stream name already in use with a different configuration', false],
    ['wrong last sequence: 7', false],
  ])('%s -> %s', (message, notReady) => {
    expect(isJetStreamNotReady(new Error(message))).toBe(notReady);
  });
});
