import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  DASHBOARD_FILE,
  dashboardExpressions,
  exportedSeriesNames,
  metricNamesInPromQL,
  REPO_ROOT,
  RULES_FILE,
  ruleExpressions,
  unknownMetrics,
} from '../../scripts/deploy-checks';

const PROM_DIR = path.join(REPO_ROOT, 'deploy', 'prometheus');
const promtool = (args: string[]) => execFileSync('promtool', args, { cwd: PROM_DIR, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

describe('alert rules (promtool)', () => {
  it('promtool check rules accepts the rules file', () => {
    expect(promtool(['check', 'rules', 'sdmesh-rules.yaml'])).toMatch(/SUCCESS: \d+ rules found/);
  });

  it('promtool test rules: every alert fires on its synthetic series (and not on the normal ones)', () => {
    expect(promtool(['test', 'rules', 'sdmesh-rules.test.yaml'])).toContain('SUCCESS');
  });

  it('has the alerts the issue asks for', () => {
    const alerts = ruleExpressions(fs.readFileSync(RULES_FILE, 'utf8')).map((q) => q.where.split('/')[1]);
    for (const a of ['SdmeshDomainLowSpace', 'SdmeshDomainCriticalSpace', 'SdmeshHostLockspaceLost', 'SdmeshLeaseAcquireFailuresRising', 'SdmeshOperationsFailing', 'SdmeshOperationStuck', 'SdmeshGcBacklogGrowing', 'SdmeshSchedulerDown']) {
      expect(alerts).toContain(a);
    }
  });
});

describe('metric names in PromQL (the extractor the metric-name test relies on)', () => {
  it('finds the selected metrics, not functions, labels, keywords or durations', () => {
    expect(metricNamesInPromQL('sum by (le, sdmesh_host) (rate(sdmesh_lease_acquire_seconds_bucket{result="ok",sdmesh_host=~"$host"}[$__rate_interval]))')).toEqual([
      'sdmesh_lease_acquire_seconds_bucket',
    ]);
    expect(metricNamesInPromQL('max by (domain) (a_bytes) / on (domain) group_left max by (domain) (b_bytes) < 5 * 1024').sort()).toEqual(['a_bytes', 'b_bytes']);
    expect(metricNamesInPromQL('absent(up{sdmesh_service="scheduler"} == 1)')).toEqual(['up']);
    expect(metricNamesInPromQL('x_total offset 1h and ignoring (a) y')).toEqual(['x_total', 'y']);
  });

  it('refuses a syntax error and a selector without a metric name', () => {
    expect(() => metricNamesInPromQL('sum(rate(foo[5m])')).toThrow(/syntax error/);
    expect(() => metricNamesInPromQL('{__name__=~"sdmesh_.*"}')).toThrow(/without a metric name/);
  });

  it('reports a metric that is not exported, with where it is used', () => {
    const exposition = [
      '# HELP sdmesh_leases_held Leases held.',
      '# TYPE sdmesh_leases_held gauge',
      '# HELP sdmesh_lease_acquire_seconds Acquire time.',
      '# TYPE sdmesh_lease_acquire_seconds histogram',
      'sdmesh_lease_acquire_seconds_bucket{le="0.1"} 1',
    ].join('\n');
    const exported = exportedSeriesNames(exposition);
    expect(exported.has('sdmesh_lease_acquire_seconds_count')).toBe(true);
    const bad = { panels: [{ title: 'Copy throughput', targets: [{ expr: 'sum(rate(sdmesh_copy_bytes_total[5m])) + sum(sdmesh_leases_held)' }] }] };
    expect(unknownMetrics(dashboardExpressions(bad), exported)).toEqual([{ where: 'panel "Copy throughput"', metric: 'sdmesh_copy_bytes_total' }]);
    expect(unknownMetrics([{ where: 'rule x', expr: 'histogram_quantile(0.9, rate(sdmesh_lease_acquire_seconds_bucket[5m])) > 1 and up == 1' }], exported)).toEqual([]);
  });

  it('every query of the dashboard and the rules parses and names at least one metric', () => {
    const queries = [...dashboardExpressions(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8'))), ...ruleExpressions(fs.readFileSync(RULES_FILE, 'utf8'))];
    expect(queries.length).toBeGreaterThan(20);
    for (const q of queries) expect([q.where, metricNamesInPromQL(q.expr).length > 0]).toEqual([q.where, true]);
    expect(queries.some((q) => q.where === 'variable $host')).toBe(true);
  });
});
