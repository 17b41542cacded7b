import type { ChaosReport } from './run';

const table = (rows: Record<string, number>) =>
  Object.entries(rows)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, n]) => `  ${k.padEnd(44)} ${n}`)
    .join('\n') || '  (none)';

/** The report a chaos run prints: faults by kind, operations by outcome, violations with the seed and their history excerpt. */
export function formatReport(r: ChaosReport): string {
  const injected = Object.values(r.injected).reduce((a, b) => a + b, 0);
  const lines = [
    `== chaos run: seed ${r.seed}, ${r.hosts} hosts, ${r.natsNodes} NATS node(s), ${r.clients} clients${r.storageFaults ? ', storage faults' : ''}, load ${Math.round(r.durationMs / 1000)} s, wall ${Math.round(r.wallMs / 1000)} s, load average ${r.load.start.toFixed(1)} → ${r.load.end.toFixed(1)}`,
    `faults planned ${r.plannedFaults}, injected ${injected}, found nothing to hit ${r.plannedFaults - injected}`,
    `faults injected by kind:`,
    table(r.injected),
    `planned faults with no target at their moment:`,
    table(r.missed),
    `operations by outcome:`,
    table(r.operations),
    `audit lines ${r.auditLines}, disks at the end ${r.disksAtEnd}`,
    `violations: ${r.violations.length}`,
  ];
  for (const v of r.violations) {
    lines.push(`  [invariant ${v.invariant}] ${v.message}`, `    seed ${r.seed}; history excerpt:`, ...v.excerpt.map((e) => `      ${e}`));
  }
  lines.push(`reproduce: ${r.reproduce}`, r.violations.length ? `work directory (kept): ${r.dir}` : '');
  return lines.join('\n');
}
