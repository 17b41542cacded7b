import fs from 'node:fs';
import http from 'node:http';
import { LocalMesh } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from '../harness/paths';
import { DASHBOARD_FILE, dashboardExpressions, exportedSeriesNames, RULES_FILE, ruleExpressions, unknownMetrics } from '../../scripts/deploy-checks';

function get(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`${url}: HTTP ${res.statusCode}`))));
      })
      .on('error', reject);
  });
}

/**
 * Every metric the Grafana dashboard and the alert rules use must be exported by a service:
 * a real mesh (1 host: sanlock, lease-manager, metadata-tx, data-mover, gc; a scheduler) is
 * scraped, and each PromQL expression's metric names are looked up in what it serves.
 * prom-client prints # TYPE lines for metrics without samples yet, so a metric counts as
 * exported as soon as its service registers it.
 */
describe('metric names of the dashboard and the alerts', () => {
  const dir = makeTestDir('metrics-names');
  let mesh: LocalMesh | undefined;
  afterAll(async () => {
    await mesh?.stop();
    removeTestDir(dir);
  });

  it('every metric a dashboard panel or an alert uses is exported by some service', async () => {
    mesh = await new LocalMesh({ dir, hosts: 1, logLevel: 'warn' }).start();
    const exported = new Set<string>();
    const perService: Record<string, number> = {};
    let schedulerExposition = '';
    for (const svc of mesh.services()) {
      const body = await get(`http://127.0.0.1:${svc.metricsPort}/metrics`);
      if (svc.name === 'scheduler') schedulerExposition = body;
      const names = exportedSeriesNames(body);
      perService[svc.name] = [...names].filter((n) => n.startsWith('sdmesh_')).length;
      for (const n of names) exported.add(n);
    }
    expect(Object.keys(perService).sort()).toEqual(['data-mover', 'gc', 'lease-manager', 'metadata-tx', 'scheduler']);
    // Before any operation ran, the outcome counter has a 0 sample for every type and outcome
    // (the "operations failing" alert's increase() then counts a type's first failure).
    expect(schedulerExposition).toMatch(/^sdmesh_scheduler_operations_total\{type="MOVE_DISK",outcome="failed"[^}]*\} 0$/m);
    expect(schedulerExposition).toMatch(/^sdmesh_scheduler_operations_running(\{[^}]*\})? 0$/m);

    const queries = [...dashboardExpressions(JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8'))), ...ruleExpressions(fs.readFileSync(RULES_FILE, 'utf8'))];
    expect(queries.length).toBeGreaterThan(20);
    expect(unknownMetrics(queries, exported)).toEqual([]);

    // The check has teeth: a panel naming a metric nobody exports is reported.
    const bad = { panels: [{ title: 'Copy throughput', targets: [{ expr: 'sum by (sdmesh_host) (rate(sdmesh_copy_bytes_total[5m]))' }] }] };
    expect(unknownMetrics(dashboardExpressions(bad), exported)).toEqual([{ where: 'panel "Copy throughput"', metric: 'sdmesh_copy_bytes_total' }]);
  });
});
