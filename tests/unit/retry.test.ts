import { aborted, cancelled, failedPrecondition, hasReason, retry, SdmeshError, type RetryPolicy } from '@sdmesh/common';

/** A fake clock: sleeping advances it, so the tests are exact and instant. */
function fakeClock() {
  let t = 0;
  const waits: number[] = [];
  return {
    waits,
    now: () => t,
    sleep: async (ms: number) => {
      waits.push(ms);
      t += ms;
    },
    advance: (ms: number) => (t += ms),
  };
}

const policy: RetryPolicy = { totalMs: 10_000, initialBackoffMs: 100, maxBackoffMs: 800, retryable: (err) => hasReason(err, 'LEASE_HELD_ON_THIS_HOST') };
const busy = () => aborted('held by another operation of this host', 'LEASE_HELD_ON_THIS_HOST');

describe('retry', () => {
  it('retries retryable errors with doubling, capped, jittered backoff until success', async () => {
    const clock = fakeClock();
    let calls = 0;
    const result = await retry(
      policy,
      async (attempt) => {
        calls++;
        if (attempt < 6) throw busy();
        return 'done';
      },
      clock,
    );
    expect(result).toBe('done');
    expect(calls).toBe(6);
    const expected = [100, 200, 400, 800, 800];
    clock.waits.forEach((w, i) => {
      expect(w).toBeGreaterThanOrEqual(expected[i]! * 0.8 - 1);
      expect(w).toBeLessThanOrEqual(expected[i]! * 1.2 + 1);
    });
  });

  it('fails at once on an error the policy does not retry', async () => {
    const clock = fakeClock();
    const err = await retry(
      policy,
      async () => {
        throw failedPrecondition('no', 'VOLUME_ILLEGAL');
      },
      clock,
    ).catch((e: SdmeshError) => e);
    expect(err.reason).toBe('VOLUME_ILLEGAL');
    expect(clock.waits).toEqual([]);
  });

  it('throws the last error when time or attempts run out, never waiting past the total', async () => {
    const clock = fakeClock();
    const err = await retry(
      { ...policy, totalMs: 1000 },
      async () => {
        throw busy();
      },
      clock,
    ).catch((e: SdmeshError) => e);
    expect(err.reason).toBe('LEASE_HELD_ON_THIS_HOST');
    expect(clock.now()).toBeLessThanOrEqual(1000);
    let calls = 0;
    await retry(
      { ...policy, maxAttempts: 3 },
      async () => {
        calls++;
        throw busy();
      },
      fakeClock(),
    ).catch(() => undefined);
    expect(calls).toBe(3);
  });

  it('stops when the signal aborts, with its reason', async () => {
    const controller = new AbortController();
    const err = await retry(
      policy,
      async () => {
        controller.abort(cancelled('operation cancelled', 'OPERATION_CANCELLED'));
        throw busy();
      },
      { signal: controller.signal },
    ).catch((e: SdmeshError) => e);
    expect(err.reason).toBe('OPERATION_CANCELLED');
  });
});
