import { ServiceMetrics } from '@sdmesh/common';

/** GET /healthz of the metrics server: what the Helm chart's HTTP probes ask. */
describe('ServiceMetrics /healthz', () => {
  let metrics: ServiceMetrics;
  let base: string;

  beforeEach(async () => {
    metrics = new ServiceMetrics('test-service');
    base = `http://127.0.0.1:${await metrics.listen(0, '127.0.0.1')}`;
  });
  afterEach(() => metrics.close());

  it('is 503 until the service says it is serving, then follows the callback', async () => {
    let r = await fetch(`${base}/healthz`);
    expect([r.status, await r.text()]).toEqual([503, 'NOT_SERVING\n']);

    let serving = true;
    metrics.healthy = () => serving;
    r = await fetch(`${base}/healthz?probe=1`);
    expect([r.status, await r.text()]).toEqual([200, 'SERVING\n']);

    serving = false; // e.g. shutting down: the health service went NOT_SERVING
    expect((await fetch(`${base}/healthz`)).status).toBe(503);
  });

  it('answers 503 when the callback throws, and still serves /metrics', async () => {
    metrics.healthy = () => {
      throw new Error('boom');
    };
    expect((await fetch(`${base}/healthz`)).status).toBe(503);
    const m = await fetch(`${base}/metrics`);
    expect(m.status).toBe(200);
    expect(await m.text()).toContain('sdmesh_grpc_server_handled_total');
  });
});
