import { aborted, failedPrecondition, GrpcStatus, SdmeshError, unavailable, untilLeaseManagerAnswers, type CallOptions } from '@sdmesh/common';

/**
 * untilLeaseManagerAnswers (a lease-manager call across its restart): only UNAVAILABLE is tried
 * again, every try carries the one deadline of the caller's options, none starts after it, and
 * the caller's signal ends the waiting. The real restart: tests/integration/lease-manager-restart.test.ts.
 */
describe('untilLeaseManagerAnswers', () => {
  const refused = () => unavailable('No connection established. Last error: connect ECONNREFUSED lease-manager.sock');

  it('tries an UNAVAILABLE call again until it answers; each try gets the same absolute deadline', async () => {
    const tries: CallOptions[] = [];
    const result = await untilLeaseManagerAnswers(
      async (each) => {
        tries.push(each);
        if (tries.length < 3) throw refused();
        return 'granted';
      },
      { timeoutMs: 60_000 },
    );
    expect(result).toBe('granted');
    expect(tries).toHaveLength(3);
    expect(tries.every((t) => t.timeoutMs === undefined && t.deadline instanceof Date)).toBe(true);
    expect(new Set(tries.map((t) => t.deadline!.getTime())).size).toBe(1);
  });

  it('passes any other failure on at once (the lease-manager answered)', async () => {
    for (const err of [
      failedPrecondition('lockspace "x" is not joined', 'LOCKSPACE_NOT_JOINED'),
      new SdmeshError(GrpcStatus.DEADLINE_EXCEEDED, 'deadline passed'),
    ]) {
      let calls = 0;
      await expect(
        untilLeaseManagerAnswers(async () => {
          calls++;
          throw err;
        }, {}),
      ).rejects.toBe(err);
      expect(calls).toBe(1);
    }
  });

  it('gives up with UNAVAILABLE at the deadline, no try starting after it', async () => {
    const starts: number[] = [];
    let deadline = 0;
    const err = await untilLeaseManagerAnswers(
      async (each) => {
        starts.push(Date.now());
        deadline = each.deadline!.getTime();
        throw refused();
      },
      { timeoutMs: 400 },
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SdmeshError);
    expect((err as SdmeshError).code).toBe(GrpcStatus.UNAVAILABLE);
    expect(starts.length).toBeGreaterThan(1);
    expect(starts.every((t) => t <= deadline)).toBe(true);
  });

  it("stops waiting when the caller's signal aborts (a cancelled job), with its reason", async () => {
    const controller = new AbortController();
    let calls = 0;
    const waiting = untilLeaseManagerAnswers(
      async () => {
        calls++;
        if (calls === 2) controller.abort(aborted('job aborted'));
        throw refused();
      },
      { signal: controller.signal },
    );
    await expect(waiting).rejects.toMatchObject({ message: 'job aborted' });
    expect(calls).toBe(2);
  });

  it('tries again a failure alsoRetry names', async () => {
    let calls = 0;
    const result = await untilLeaseManagerAnswers(
      async () => {
        if (++calls === 1) throw failedPrecondition('held by this process', 'FAILED_PRECONDITION');
        return calls;
      },
      {},
      { alsoRetry: (e) => e instanceof SdmeshError && e.message === 'held by this process' },
    );
    expect(result).toBe(2);
  });
});
