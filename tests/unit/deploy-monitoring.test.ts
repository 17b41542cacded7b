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
    for (const a of [
      'SdmeshDomainLowSpace',
      'SdmeshDomainCriticalSpace',
      'SdmeshHostLockspaceLost',
      'SdmeshLeaseAcquireFailuresRising',
      'SdmeshOperationsFailing',
      'SdmeshOperationStuck',
      'SdmeshSchedulerOperationsFailing',
      'SdmeshDomainLeaseWaitLong',
      'SdmeshGcBacklogGrowing',
      'SdmeshSchedulerDown',
    ]) {
      expect(alerts).toContain(a);
    }
  });

  it('"operation stuck" is the scheduler\'s last-progress stamp, "operations failing" its outcome counter', () => {
    const rules = ruleExpressions(fs.readFileSync(RULES_FILE, 'utf8'));
    const exprOf = (alert: string) => rules.find((q) => q.where.split('/')[1] === alert)?.expr ?? '';
    expect(metricNamesInPromQL(exprOf('SdmeshOperationStuck'))).toEqual(['sdmesh_scheduler_operation_last_progress_timestamp_seconds']);
    expect(new Set(metricNamesInPromQL(exprOf('SdmeshSchedulerOperationsFailing')))).toEqual(new Set(['sdmesh_scheduler_operations_total']));
  });
});

describe('dashboard', () => {
  it("shows every scheduler operation metric, the data copies, the GC and the domains' free space", () => {
    const used = new Set(dashboardExpressions(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8'))).flatMap((q) => metricNamesInPromQL(q.expr)));
    for (const m of [
      'sdmesh_scheduler_operations_total',
      'sdmesh_scheduler_operation_duration_seconds_bucket',
      'sdmesh_scheduler_operations_running',
      'sdmesh_scheduler_queue_depth',
      'sdmesh_scheduler_lock_wait_seconds_bucket',
      'sdmesh_scheduler_placements_total',
      'sdmesh_scheduler_operation_last_progress_timestamp_seconds',
      'sdmesh_scheduler_operation_watchers',
      'sdmesh_scheduler_operations_purged_total',
      'sdmesh_data_mover_bytes_copied_total',
      'sdmesh_gc_backlog_items',
      'sdmesh_gc_bytes_freed_total',
      'sdmesh_domain_free_bytes',
      'sdmesh_domain_capacity_bytes',
    ]) {
      expect([m, used.has(m)]).toEqual([m, true]);
    }
  });

  it('panels have unique ids and do not overlap', () => {
    const panels = (
      JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8')) as {
        panels: { id: number; title: string; gridPos: { x: number; y: number; w: number; h: number } }[];
      }
    ).panels;
    expect(new Set(panels.map((p) => p.id)).size).toBe(panels.length);
    const cells = new Map<string, string>();
    for (const p of panels) {
      for (let y = p.gridPos.y; y < p.gridPos.y + p.gridPos.h; y++) {
        for (let x = p.gridPos.x; x < p.gridPos.x + p.gridPos.w; x++) {
          const key = `${x},${y}`;
          expect([p.title, cells.get(key)]).toEqual([p.title, undefined]);
          cells.set(key, p.title);
        }
      }
    }
  });
});

describe('metric names in PromQL (the extractor the metric-name test relies on)', () => {
  it('finds the selected metrics, not functions, labels, keywords or durations', () => {
    expect(
      metricNamesInPromQL('sum by (le, sdmesh_host) (rate(sdmesh_lease_acquire_seconds_bucket{result="ok",sdmesh_host=~"$host"}[$__rate_interval]))'),
    ).toEqual(['sdmesh_lease_acquire_seconds_bucket']);
    expect(metricNamesInPromQL('max by (domain) (a_bytes) / on (domain) group_left max by (domain) (b_bytes) < 5 * 1024').sort()).toEqual([
      'a_bytes',
      'b_bytes',
    ]);
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
    expect(
      unknownMetrics([{ where: 'rule x', expr: 'histogram_quantile(0.9, rate(sdmesh_lease_acquire_seconds_bucket[5m])) > 1 and up == 1' }], exported),
    ).toEqual([]);
  });

  it('every query of the dashboard and the rules parses and names at least one metric', () => {
    const queries = [...dashboardExpressions(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8'))), ...ruleExpressions(fs.readFileSync(RULES_FILE, 'utf8'))];
    expect(queries.length).toBeGreaterThan(20);
    for (const q of queries) expect([q.where, metricNamesInPromQL(q.expr).length > 0]).toEqual([q.where, true]);
    expect(queries.some((q) => q.where === 'variable $host')).toBe(true);
  });
});
