import {
  aborted,
  compareLeaseKeys,
  holdLeasesInOrder,
  isLeaseHeld,
  orderLeaseClaims,
  Reason,
  SdmeshError,
  type LeaseClaim,
  type LeaseMode,
} from '@sdmesh/common/internal';

/** Fake leases that record what happens to them, in order; `busy` ones refuse to be taken. */
function fakeLeases(busy: string[] = []) {
  const events: string[] = [];
  const held = new Set<string>();
  const claim = (lockspace: string, resource: string, mode: LeaseMode = 'exclusive'): LeaseClaim => ({
    lockspace,
    resource,
    mode,
    async hold(body) {
      const name = `${lockspace}/${resource}`;
      if (busy.includes(name)) {
        events.push(`refused ${name}`);
        throw aborted(`${name} is held`, Reason.LEASE_HELD);
      }
      events.push(`acquire ${name} ${mode}`);
      held.add(name);
      try {
        await body();
      } finally {
        held.delete(name);
        events.push(`release ${name}`);
      }
    },
  });
  return { events, held, claim };
}

describe('compareLeaseKeys', () => {
  it.each([
    ['lockspace first', { lockspace: 'a', resource: 'z' }, { lockspace: 'b', resource: 'a' }, -1],
    ['then resource', { lockspace: 'a', resource: 'b' }, { lockspace: 'a', resource: 'a' }, 1],
    ['equal keys', { lockspace: 'a', resource: 'x' }, { lockspace: 'a', resource: 'x' }, 0],
    // Code units, not the locale: upper case before lower case, digits before letters.
    ['code-unit order, not locale order', { lockspace: 'd', resource: 'SDM' }, { lockspace: 'd', resource: 'abc' }, -1],
    ['digits before letters', { lockspace: 'd', resource: '9f' }, { lockspace: 'd', resource: 'SDM' }, -1],
    // A separator-joined key would order "a/…" against "a-…" by the separator; the pair does not.
    ['no joined-string artefacts', { lockspace: 'a', resource: 'z' }, { lockspace: 'a-b', resource: 'a' }, -1],
  ])('%s', (_name, a, b, expected) => {
    expect(Math.sign(compareLeaseKeys(a, b))).toBe(expected);
    expect(Math.sign(compareLeaseKeys(b, a))).toBe(-expected || 0);
  });
});

describe('orderLeaseClaims', () => {
  it('sorts by (lockspace, resource) whatever order the claims come in', () => {
    const { claim } = fakeLeases();
    const ordered = orderLeaseClaims([claim('d2', 'v1'), claim('d1', 'v9'), claim('d1', 'v2')]);
    expect(ordered.map((c) => `${c.lockspace}/${c.resource}`)).toEqual(['d1/v2', 'd1/v9', 'd2/v1']);
  });

  it('takes a lease claimed twice in one mode once', () => {
    const { claim } = fakeLeases();
    const ordered = orderLeaseClaims([claim('d', 'v', 'shared'), claim('d', 'w'), claim('d', 'v', 'shared')]);
    expect(ordered.map((c) => `${c.resource} ${c.mode}`)).toEqual(['v shared', 'w exclusive']);
  });

  it('refuses one lease claimed in two modes, naming it', () => {
    const { claim } = fakeLeases();
    let error: unknown;
    try {
      orderLeaseClaims([claim('d', 'v', 'shared'), claim('d', 'v', 'exclusive')]);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(SdmeshError);
    expect((error as SdmeshError).reason).toBe(Reason.LEASE_MODE_CONFLICT);
    expect((error as SdmeshError).message).toContain('lease "v" of lockspace "d"');
  });
});

describe('holdLeasesInOrder', () => {
  it('acquires in lease order, runs fn with all held, releases in reverse', async () => {
    const { events, held, claim } = fakeLeases();
    const result = await holdLeasesInOrder([claim('dst', 'v2', 'exclusive'), claim('src', 'v1', 'shared'), claim('dst', 'v1')], async () => {
      events.push(`run with ${[...held].sort().join(',')}`);
      return 42;
    });
    expect(result).toBe(42);
    expect(events).toEqual([
      'acquire dst/v1 exclusive',
      'acquire dst/v2 exclusive',
      'acquire src/v1 shared',
      'run with dst/v1,dst/v2,src/v1',
      'release src/v1',
      'release dst/v2',
      'release dst/v1',
    ]);
  });

  it('releases what it holds, in reverse, when a later acquire fails; fn never runs', async () => {
    const { events, held, claim } = fakeLeases(['d/c']);
    let ran = false;
    const outcome = holdLeasesInOrder([claim('d', 'c'), claim('d', 'a'), claim('d', 'b'), claim('d', 'e')], async () => {
      ran = true;
    });
    const error = await outcome.then(
      () => 'resolved',
      (err: unknown) => err,
    );
    expect(isLeaseHeld(error)).toBe(true);
    expect(ran).toBe(false);
    expect(held.size).toBe(0);
    expect(events).toEqual(['acquire d/a exclusive', 'acquire d/b exclusive', 'refused d/c', 'release d/b', 'release d/a']);
  });

  it('releases every lease, in reverse, when fn throws, and passes the error on', async () => {
    const { events, claim } = fakeLeases();
    const boom = new Error('boom');
    await expect(
      holdLeasesInOrder([claim('d', 'b'), claim('d', 'a')], async () => {
        throw boom;
      }),
    ).rejects.toBe(boom);
    expect(events).toEqual(['acquire d/a exclusive', 'acquire d/b exclusive', 'release d/b', 'release d/a']);
  });

  it('takes no lease when two claims conflict in mode', async () => {
    const { events, claim } = fakeLeases();
    await expect(holdLeasesInOrder([claim('d', 'a'), claim('d', 'b', 'shared'), claim('d', 'b', 'exclusive')], async () => undefined)).rejects.toMatchObject({
      reason: Reason.LEASE_MODE_CONFLICT,
    });
    expect(events).toEqual([]);
  });

  it('runs fn directly with no claims', async () => {
    await expect(holdLeasesInOrder([], async () => 'alone')).resolves.toBe('alone');
  });
});
