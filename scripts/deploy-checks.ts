/**
 * Helpers of the deployment checks (tests/unit/helm-*.test.ts, tests/unit/deploy-*.test.ts,
 * tests/integration/metrics-names.test.ts): render the Helm chart with the helm binary that
 * an npm package ships, and find the metric names a PromQL expression uses.
 */
import path from 'node:path';
import { parse as parseYaml } from 'yaml';

// The chart rendering lives in @sdmesh/localmesh (the mesh as containers runs its pods too).
export { CHART_DIR, helm, helmBinary, helmTemplate, type HelmResult, type K8sObject } from '@sdmesh/localmesh';

export const REPO_ROOT = path.resolve(__dirname, '..');
export const RULES_FILE = path.join(REPO_ROOT, 'deploy', 'prometheus', 'sdmesh-rules.yaml');
export const DASHBOARD_FILE = path.join(REPO_ROOT, 'deploy', 'grafana', 'sdmesh-dashboard.json');

// The package is ESM with a CommonJS build (dist/index.cjs), which require() picks.
const { parser: promqlParser } = require('@prometheus-io/lezer-promql') as { parser: import('@lezer/lr').LRParser };

/** Metrics that Prometheus itself makes (not exported by any service). */
export const PROMETHEUS_SYNTHETIC_METRICS = new Set(['up', 'scrape_duration_seconds', 'scrape_samples_scraped', 'ALERTS', 'ALERTS_FOR_STATE']);

/**
 * The metric names a PromQL expression selects (`foo{a="b"}[5m]`, `rate(bar_total[1m])`, ...).
 * Grafana's $__rate_interval-style variables are replaced by a duration first; variables in
 * label values are inside strings and harmless. Throws on a syntax error, and on selectors
 * without a plain metric name (`{__name__=~...}`), which no name check could cover.
 */
export function metricNamesInPromQL(expr: string): string[] {
  const text = expr.replace(/\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}/g, '5m');
  const tree = promqlParser.parse(text);
  const names = new Set<string>();
  const cursor = tree.cursor();
  do {
    if (cursor.type.isError) throw new Error(`PromQL syntax error at ${cursor.from} in: ${expr}`);
    if (cursor.name === 'VectorSelector') {
      const node = cursor.node;
      const id = node.getChild('Identifier');
      if (!id) throw new Error(`selector without a metric name in: ${expr}`);
      names.add(text.slice(id.from, id.to));
    }
  } while (cursor.next());
  return [...names];
}

/** Base metric names of a Prometheus text exposition, with the series names each type gives. */
export function exportedSeriesNames(exposition: string): Set<string> {
  const out = new Set<string>();
  for (const line of exposition.split('\n')) {
    const m = /^# TYPE (\S+) (\S+)/.exec(line);
    if (m) {
      const [, name, type] = m;
      out.add(name);
      if (type === 'histogram') for (const s of ['_bucket', '_sum', '_count']) out.add(name + s);
      if (type === 'summary') for (const s of ['_sum', '_count']) out.add(name + s);
      continue;
    }
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
    if (sample) out.add(sample[1]);
  }
  return out;
}

export interface QueryRef {
  where: string;
  expr: string;
}

/** Every PromQL expression of a rules file (`groups[].rules[].expr`). */
export function ruleExpressions(rulesYaml: string): QueryRef[] {
  const doc = parseYaml(rulesYaml) as { groups: { name: string; rules: { alert?: string; record?: string; expr: string }[] }[] };
  return doc.groups.flatMap((g) => g.rules.map((r) => ({ where: `rule ${g.name}/${r.alert ?? r.record}`, expr: String(r.expr) })));
}

/** Every PromQL expression of a Grafana dashboard: panel targets and query variables. */
export function dashboardExpressions(dashboard: unknown): QueryRef[] {
  const out: QueryRef[] = [];
  const d = dashboard as {
    panels?: { title: string; targets?: { expr?: string }[]; panels?: unknown[] }[];
    templating?: { list?: { name: string; type: string; query?: string | { query?: string } }[] };
  };
  const visit = (panels: typeof d.panels) => {
    for (const p of panels ?? []) {
      for (const t of p.targets ?? []) if (t.expr) out.push({ where: `panel "${p.title}"`, expr: t.expr });
      visit(p.panels as typeof d.panels);
    }
  };
  visit(d.panels);
  for (const v of d.templating?.list ?? []) {
    if (v.type !== 'query') continue;
    const q = typeof v.query === 'string' ? v.query : (v.query?.query ?? '');
    // label_values(<selector>, label) / query_result(<expr>): the selector is PromQL.
    const m = /^\s*(?:label_values|query_result)\((.*?)(?:,\s*[a-zA-Z_][a-zA-Z0-9_]*)?\)\s*$/.exec(q);
    if (m) out.push({ where: `variable $${v.name}`, expr: m[1] });
    else if (q.trim()) out.push({ where: `variable $${v.name}`, expr: q });
  }
  return out;
}

/** The metric names each query uses that are not in `exported` (nor Prometheus' own). */
export function unknownMetrics(queries: QueryRef[], exported: Set<string>): { where: string; metric: string }[] {
  const missing: { where: string; metric: string }[] = [];
  for (const q of queries) {
    for (const name of metricNamesInPromQL(q.expr)) {
      if (!exported.has(name) && !PROMETHEUS_SYNTHETIC_METRICS.has(name)) missing.push({ where: q.where, metric: name });
    }
  }
  return missing;
}
