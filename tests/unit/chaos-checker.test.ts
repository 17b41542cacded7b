import type { AuditLine } from '@sdmesh/common';
import { check, emptyObservation, type Observed } from '../chaos/checker';
import { planFaults } from '../chaos/faults';
import type { HistoryLine } from '../chaos/history';
import { matchesHistory, type DiskModel } from '../chaos/workload';

/** The chaos checker on small hand-made histories: it passes a clean one and names each broken invariant. */
describe('chaos checker', () => {
  const settled = (extra: Partial<Observed> = {}): Observed => ({
    ...emptyObservation(),
    listedDisks: [{ id: 'disk-1', domainId: 'dom-a', legal: true }],
    contents: [{ id: 'disk-1', ok: true }],
    end: 1_000_000,
    ...extra,
  });

  const expected = [{ id: 'disk-1', domainId: 'dom-a' }];
  const grant = (t: number, pid: number, resource = 'vol-1'): AuditLine => ({
    t,
    kind: 'lease-grant',
    host: 'host1',
    pid,
    lockspace: 'dom-a',
    resource,
    mode: 'exclusive',
    offset: 3 << 20,
  });
  const release = (t: number, pid: number, resource = 'vol-1'): AuditLine => ({
    t,
    kind: 'lease-release',
    host: 'host1',
    pid,
    lockspace: 'dom-a',
    resource,
    mode: 'exclusive',
    offset: 3 << 20,
  });
  const write = (
    t: number,
    pid: number,
    phase: 'record' | 'data-start' | 'data-end',
    generation: number,
    record?: { generation: number; legality: string },
  ): AuditLine => ({
    t,
    kind: 'write',
    phase,
    host: 'host1',
    pid,
    domain: 'dom-a',
    volume: 'vol-1',
    generation,
    leaseOffset: 3 << 20,
    incarnation: 1,
    ...(record ? { recordGeneration: record.generation, legality: record.legality } : {}),
  });
  /** One copy by pid: lease, ILLEGAL, data, LEGAL generation+1, release. */
  const copy = (pid: number, from: number, generation: number): AuditLine[] => [
    grant(from, pid),
    write(from + 10, pid, 'record', generation, { generation, legality: 'ILLEGAL' }),
    write(from + 20, pid, 'data-start', generation),
    write(from + 80, pid, 'data-end', generation),
    write(from + 90, pid, 'record', generation, { generation: generation + 1, legality: 'LEGAL' }),
    release(from + 100, pid),
  ];

  test('a clean history: no violation', () => {
    expect(check([], [...copy(100, 1000, 1), ...copy(200, 2000, 2)], expected, settled())).toEqual([]);
  });

  test('a write outside its exclusive lease (the negative control build) is invariant 3', () => {
    const audit = copy(100, 1000, 1).filter((l) => l.kind === 'write');
    const v = check([], audit, expected, settled());
    expect(v.map((x) => x.invariant)).toContain(3);
    expect(v[0]!.message).toMatch(/without holding its exclusive lease/);
  });

  test('two writers at once: a dead writer whose interval is open until its death overlaps the next one', () => {
    const dead = copy(100, 1000, 1).slice(0, 3); // granted, ILLEGAL, data started ... and killed
    const v = check([], [...dead, ...copy(200, 1500, 1)], expected, settled({ deaths: new Map([[100, { lastAlive: 1700, firstDead: 1800 }]]) }));
    expect(v.some((x) => x.invariant === 3 && /two exclusive lease holders/.test(x.message))).toBe(true);
    expect(v.some((x) => x.invariant === 3 && /two writers/.test(x.message))).toBe(true);
  });

  test('a death seen only after the next grant is not called an overlap (between last seen alive and first seen dead)', () => {
    const dead = copy(100, 1000, 1).slice(0, 3);
    const v = check([], [...dead, ...copy(200, 1500, 1)], expected, settled({ deaths: new Map([[100, { lastAlive: 1400, firstDead: 1550 }]]) }));
    expect(v).toEqual([]);
  });

  test('a writer under an older generation than one committed is invariant 3', () => {
    const v = check([], [...copy(100, 1000, 1), ...copy(200, 2000, 1)], expected, settled());
    expect(v.some((x) => x.invariant === 3 && /under generation 1 after pid 100 had committed generation 2/.test(x.message))).toBe(true);
  });

  test('one volume id, two leases (a disk moved back beside its garbage) and a re-created volume starting again at generation 0: no violation', () => {
    const garbageSlot: AuditLine = { ...grant(1500, 300), offset: 9 << 20 } as AuditLine;
    const recreated = copy(200, 2000, 0).map((l) => (l.kind === 'write' ? { ...l, incarnation: 2 } : l));
    expect(check([], [...copy(100, 1000, 1), garbageSlot, ...recreated], expected, settled())).toEqual([]);
  });

  test('a guest write while another process holds the exclusive lease is invariant 3', () => {
    const guest: HistoryLine = {
      t: 1050,
      kind: 'guest-write',
      client: 0,
      disk: 'disk-1',
      domain: 'dom-a',
      volume: 'vol-1',
      leaseOffset: 3 << 20,
      pattern: 7,
      offset: 0,
      length: 65536,
      pid: 999,
      start: 1040,
      end: 1060,
      ok: true,
    };
    const v = check([guest], copy(100, 1000, 1), expected, settled());
    expect(v.some((x) => /guest write of client 0/.test(x.message))).toBe(true);
  });

  test('invariants 1, 2, 4 and 5 from what the settled mesh shows', () => {
    const v = check(
      [],
      [],
      [...expected, { id: 'disk-2', domainId: 'dom-a' }],
      settled({
        unfinishedOperations: [{ name: 'operations/x', status: 'OPERATION_STATUS_RUNNING' }],
        listedDisks: [
          { id: 'disk-1', domainId: 'dom-a', legal: false },
          { id: 'disk-9', domainId: 'dom-a', legal: true },
        ],
        contents: [{ id: 'disk-1', ok: false }],
        heldLeases: [{ host: 'host2', lockspace: 'dom-a', resource: 'vol-1', pid: 5, mode: 'LEASE_MODE_EXCLUSIVE' }],
        garbage: [{ domain: 'dom-a', items: ['images/_remove_me_x'] }],
        checkFindings: [{ domain: 'dom-a', check: 'volume-metadata', where: 'images/x/y.meta', message: 'bad checksum' }],
        outsideChanges: ['/storage/outside/sentinel.raw changed'],
      }),
    );
    expect(v.map((x) => x.invariant).sort()).toEqual([1, 1, 2, 2, 2, 2, 4, 4, 5]);
  });

  test('the KV inventory disagreeing with storage is invariant 4, with the disk in the excerpt ids', () => {
    const id = '0b6c7a52-8f0e-4b55-9d43-2f8d3c1e9a10';
    const v = check(
      [],
      [],
      expected,
      settled({ inventory: [{ domain: 'chaos-a', message: `disk ${id} is on storage (1 volumes) but ListDisks does not list it` }] }),
    );
    expect(v).toHaveLength(1);
    expect(v[0]).toMatchObject({ invariant: 4, about: [id] });
    expect(v[0]!.message).toMatch(/KV inventory vs storage, domain chaos-a/);
  });

  test('a GC removal outside the domain metadata lease (the gc-without-domain-lease build) is invariant 3; under it, none', () => {
    const sdm = (t: number, kind: 'lease-grant' | 'lease-release'): AuditLine => ({
      t,
      kind,
      host: 'host2',
      pid: 300,
      lockspace: 'dom-a',
      resource: 'SDM',
      mode: 'exclusive',
      offset: 0,
    });
    const removal = (t: number): AuditLine => ({
      t,
      kind: 'write',
      phase: 'remove',
      host: 'host2',
      pid: 300,
      domain: 'dom-a',
      volume: 'SDM',
      generation: -1,
      leaseOffset: 0,
    });
    expect(check([], [sdm(100, 'lease-grant'), removal(110), removal(150), sdm(160, 'lease-release')], expected, settled())).toEqual([]);
    const v = check([], [removal(110), removal(150)], expected, settled());
    expect(v.map((x) => x.invariant)).toEqual([3, 3]);
    expect(v[0]!.message).toMatch(/pid 300 on host2 wrote volume dom-a\/SDM@0 \(remove\) without holding its exclusive lease/);
    // A removal after the release is outside it too.
    expect(check([], [sdm(100, 'lease-grant'), sdm(160, 'lease-release'), removal(170)], expected, settled())).toHaveLength(1);
  });

  test('storage faults are planned only when asked for; without them a seed keeps the plan it always had', () => {
    const plain = planFaults(16, 30, 90_000, 3);
    expect(planFaults(16, 30, 90_000, 3, { storage: false })).toEqual(plain);
    expect(plain.some((f) => ['fill-domain', 'slow-storage', 'lockspace-unwritable'].includes(f.kind))).toBe(false);
    const storage = planFaults(21, 200, 600_000, 3, { storage: true });
    expect(planFaults(21, 200, 600_000, 3, { storage: true })).toEqual(storage);
    const kinds = new Set(storage.map((f) => f.kind));
    for (const k of ['fill-domain', 'slow-storage', 'lockspace-unwritable']) expect(kinds.has(k as never)).toBe(true);
    // Fills and slow paths last 5-20 s, an unwritable lockspace 10-16 s (past sanlock's 8 s renewal limit at io_timeout 1).
    for (const f of storage.filter((x) => x.kind === 'lockspace-unwritable')) expect(f.durationMs).toBeGreaterThanOrEqual(10_000);
  });

  test('a guest write that failed with ENOSPC: each byte of its range is the earlier value or its pattern, nothing else', () => {
    const disk: DiskModel = {
      id: 'disk-1',
      domainId: 'dom-a',
      capacity: 16,
      chain: 1,
      template: false,
      writes: [
        { offset: 0, length: 8, pattern: 1 },
        { offset: 4, length: 8, pattern: 2, uncertain: true },
      ],
    };
    const bytes = (...b: number[]) => Buffer.from([...b, ...Array(16 - b.length).fill(0)]);
    expect(matchesHistory(bytes(1, 1, 1, 1, 1, 1, 1, 1), disk)).toBe(true); // nothing of it landed
    expect(matchesHistory(bytes(1, 1, 1, 1, 2, 2, 1, 1, 2, 2), disk)).toBe(true); // parts landed
    expect(matchesHistory(bytes(1, 1, 1, 1, 3), disk)).toBe(false); // a byte neither wrote
    expect(matchesHistory(bytes(2, 1, 1, 1), disk)).toBe(false); // outside its range
    // A certain write after it settles the range again.
    disk.writes.push({ offset: 4, length: 2, pattern: 5 });
    expect(matchesHistory(bytes(1, 1, 1, 1, 5, 5, 2, 2, 2), disk)).toBe(true);
    expect(matchesHistory(bytes(1, 1, 1, 1, 2, 5), disk)).toBe(false);
    expect(matchesHistory(Buffer.alloc(8), disk)).toBe(false); // a short read
  });

  test('the fault plan is a function of the seed alone', () => {
    const a = planFaults(16, 30, 90_000, 3);
    expect(planFaults(16, 30, 90_000, 3)).toEqual(a);
    expect(planFaults(17, 30, 90_000, 3)).not.toEqual(a);
    expect(a).toHaveLength(30);
    expect(a.every((f, i) => i === 0 || f.atMs >= a[i - 1]!.atMs)).toBe(true);
    expect(new Set(a.map((f) => f.kind)).size).toBeGreaterThanOrEqual(6);
  });
});
