/**
 * `npm run chaos -- --faults N --seed S --hosts H --duration 10m [--clients C] [--nats-nodes 3] [--seeds S1,S2,...] [--storage-faults] [--broken skip-destination-lease]`:
 * chaos runs (docs/chaos.md), one per seed, each report printed; exit status 1 when any run found a violation.
 */
import { runChaos, type ChaosReport } from './run';
import { formatReport } from './report';

function parseDuration(s: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(s.trim());
  if (!m) throw new Error(`bad duration "${s}" (e.g. 90s, 10m, 1h)`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  return Math.round(Number(m[1]) * unit);
}

/** Options without a value. */
const FLAGS = ['storage-faults'];

function parseArgs(argv: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--')) throw new Error(`unexpected argument "${a}"`);
    if (FLAGS.includes(a.slice(2))) {
      out[a.slice(2)] = 'true';
      continue;
    }
    const [k, v] = a.includes('=') ? [a.slice(2, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a.slice(2), argv[++i] ?? ''];
    out[k] = v;
  }
  return out;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const known = ['faults', 'seed', 'seeds', 'hosts', 'duration', 'clients', 'nats-nodes', 'broken', 'copy-rate', ...FLAGS];
  for (const k of Object.keys(args)) if (!known.includes(k)) throw new Error(`unknown option --${k}; known: ${known.map((x) => '--' + x).join(' ')}`);
  const seeds = (args.seeds ?? args.seed ?? String(Date.now() % 100000)).split(',').map(Number);
  const reports: ChaosReport[] = [];
  let unfinished = 0;
  for (const seed of seeds) {
    const report = await runChaos({
      seed,
      faults: Number(args.faults ?? 30),
      durationMs: parseDuration(args.duration ?? '3m'),
      hosts: Number(args.hosts ?? 3),
      clients: Number(args.clients ?? 3),
      natsNodes: Number(args['nats-nodes'] ?? 1),
      broken: args.broken ? args.broken.split(',') : undefined,
      copyRateLimit: args['copy-rate'] ? Number(args['copy-rate']) : undefined,
      storageFaults: args['storage-faults'] === 'true',
      log: (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`),
    }).catch((err: unknown) => {
      // One seed's run that could not finish (the mesh never settled ...) does not stop the others.
      unfinished++;
      process.stdout.write(`== chaos run: seed ${seed} did not finish: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      return undefined;
    });
    if (!report) continue;
    reports.push(report);
    process.stdout.write(formatReport(report) + '\n');
  }
  if (reports.length > 1) {
    const faults = reports.reduce((s, r) => s + Object.values(r.injected).reduce((a, b) => a + b, 0), 0);
    const violations = reports.reduce((s, r) => s + r.violations.length, 0);
    process.stdout.write(`\nall seeds (${seeds.join(', ')}): ${faults} faults injected, ${violations} violations, ${unfinished} runs did not finish\n`);
  }
  process.exit(unfinished ? 2 : reports.some((r) => r.violations.length) ? 1 : 0);
}

// Interrupted: exit through process.exit, so localmesh's exit handler SIGKILLs every process the mesh started.
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));

main().catch((err: unknown) => {
  process.stderr.write(`chaos: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(2);
});
