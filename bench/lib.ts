/** Small helpers shared by the benchmarks. */

export function percentile(sorted: number[], p: number): number {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export interface LatencySummary {
  name: string;
  n: number;
  p50: number;
  p90: number;
  p95: number;
  p99: number;
  mean: number;
  opsPerSecond: number;
}

/** Runs fn n times (after warmup) sequentially and summarizes the latencies in ms. */
export async function measure(name: string, n: number, fn: () => Promise<void>, warmup = 10): Promise<LatencySummary> {
  for (let i = 0; i < warmup; i++) await fn();
  const times: number[] = [];
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return summarize(name, times, Number(process.hrtime.bigint() - start) / 1e9);
}

/** Summarizes latencies in ms of calls that took totalSeconds of wall time in all. */
export function summarize(name: string, latenciesMs: number[], totalSeconds: number): LatencySummary {
  const times = [...latenciesMs].sort((a, b) => a - b);
  const n = times.length;
  return {
    name,
    n,
    p50: percentile(times, 50),
    p90: percentile(times, 90),
    p95: percentile(times, 95),
    p99: percentile(times, 99),
    mean: times.reduce((a, b) => a + b, 0) / n,
    opsPerSecond: n / totalSeconds,
  };
}

export function printTable(rows: LatencySummary[], baseline?: string): void {
  const base = rows.find((r) => r.name === baseline);
  const header = ['case', 'n', 'p50 ms', 'p90 ms', 'p99 ms', 'ops/s', base ? `p50 vs ${base.name}` : ''];
  const lines = rows.map((r) => [
    r.name,
    String(r.n),
    r.p50.toFixed(2),
    r.p90.toFixed(2),
    r.p99.toFixed(2),
    r.opsPerSecond.toFixed(1),
    base ? `${(r.p50 / base.p50).toFixed(2)}x` : '',
  ]);
  printColumns(header, lines);
}

/** Prints rows as aligned columns, two spaces apart. */
export function printColumns(header: string[], lines: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  for (const l of [header, ...lines])
    console.log(
      l
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    );
}

/** Runs a benchmark's main: exit 0 when it is done, 1 with the error when it fails. */
export function runBench(main: () => Promise<void>): void {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
