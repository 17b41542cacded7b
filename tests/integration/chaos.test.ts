import fs from 'node:fs';
import { planFaults } from '../chaos/faults';
import { formatReport } from '../chaos/report';
import { runChaos, type ChaosReport } from '../chaos/run';

/**
 * The short seeded chaos run of CI (docs/chaos.md): 3 hosts, 2 scheduler replicas, 3 clients of
 * the public API, 30 faults from seed 16 over 60 s of load, then the settle and the checker; and
 * the negative controls: the same machinery on a build whose copies skip the destination's lease,
 * and whose GC removes garbage without the domain metadata lease, must report both. Longer runs: `npm run chaos`.
 */
describe('chaos', () => {
  const SEED = 16;
  const FAULTS = 30;
  const LOAD_MS = 60_000;
  let report: ChaosReport | undefined;

  afterAll(() => {
    if (report) console.log(formatReport(report));
  });

  test('a short seeded run: every planned fault lands (or finds nothing to hit), the load goes on, and the checker finds no violation', async () => {
    report = await runChaos({ seed: SEED, faults: FAULTS, durationMs: LOAD_MS, hosts: 3, clients: 3, natsNodes: 1 });
    // Deterministic in what it injects: the plan comes from the seed, and each planned fault is accounted for once.
    const planned: Record<string, number> = {};
    for (const f of planFaults(SEED, FAULTS, LOAD_MS, 3)) planned[f.kind] = (planned[f.kind] ?? 0) + 1;
    const accounted: Record<string, number> = {};
    for (const [k, n] of [...Object.entries(report.injected), ...Object.entries(report.missed)]) accounted[k] = (accounted[k] ?? 0) + n;
    expect(accounted).toEqual(planned);
    expect(Object.values(report.injected).reduce((a, b) => a + b, 0)).toBeGreaterThanOrEqual(FAULTS / 2);
    // The load ran: operations of several kinds ended DONE, and the audit trail saw leases and writes.
    const doneKinds = Object.keys(report.operations).filter((k) => k.endsWith(' DONE'));
    expect(doneKinds.length).toBeGreaterThanOrEqual(4);
    expect(report.auditLines).toBeGreaterThan(0);
    expect(report.violations.map((v) => `[${v.invariant}] ${v.message}`)).toEqual([]);
  }, 600_000);

  test('negative controls: copies that skip the destination lease and a GC that removes without the domain lease (test-only switches) are reported as writes outside an exclusive lease', async () => {
    // Both switches in one short run (CI time): each is its own finding of invariant 3.
    const broken = await runChaos({
      seed: 3,
      faults: 0,
      durationMs: 25_000,
      hosts: 2,
      clients: 3,
      natsNodes: 1,
      broken: ['skip-destination-lease', 'gc-without-domain-lease'],
    });
    const outside = broken.violations.filter((v) => v.invariant === 3 && /without holding its exclusive lease/.test(v.message));
    // A copy's destination volume (data or record) ...
    expect(outside.some((v) => /\((record|data-start)\)/.test(v.message) && !/\/SDM@/.test(v.message))).toBe(true);
    // ... and the GC's removals under what should have been the domain metadata lease.
    expect(outside.some((v) => /\/SDM@0 \(remove\)/.test(v.message))).toBe(true);
    // Each violation names the seed's history: the lines about the volume that was written.
    expect(broken.violations[0]!.excerpt.length).toBeGreaterThan(0);
    fs.rmSync(broken.dir, { recursive: true, force: true });
  }, 300_000);
});
