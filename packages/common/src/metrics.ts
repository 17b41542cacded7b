import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Histogram, Registry } from 'prom-client';

/** One Prometheus registry per service, with default process metrics and gRPC metrics. */
export class ServiceMetrics {
  readonly registry = new Registry();
  readonly grpcHandled: Counter<'service' | 'method' | 'code'>;
  readonly grpcDuration: Histogram<'service' | 'method'>;
  readonly authDenied: Counter<'service' | 'method' | 'reason'>;
  /**
   * What GET /healthz answers: 200 while this returns true (the service's gRPC server is
   * SERVING), 503 otherwise. The HTTP probes of the Helm chart use it, since the gRPC health
   * service needs a client certificate that kubelet does not have. Not serving until set.
   */
  healthy: () => boolean = () => false;
  private server?: http.Server;

  constructor(
    readonly service: string,
    hostName = '',
  ) {
    this.registry.setDefaultLabels({ sdmesh_service: service, ...(hostName ? { sdmesh_host: hostName } : {}) });
    collectDefaultMetrics({ register: this.registry });
    this.grpcHandled = new Counter({
      name: 'sdmesh_grpc_server_handled_total',
      help: 'gRPC calls completed, by method and status code.',
      labelNames: ['service', 'method', 'code'],
      registers: [this.registry],
    });
    this.grpcDuration = new Histogram({
      name: 'sdmesh_grpc_server_handling_seconds',
      help: 'gRPC call duration.',
      labelNames: ['service', 'method'],
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
      registers: [this.registry],
    });
    this.authDenied = new Counter({
      name: 'sdmesh_grpc_auth_denied_total',
      help: 'gRPC calls refused by authentication or authorization, by method and reason.',
      labelNames: ['service', 'method', 'reason'],
      registers: [this.registry],
    });
  }

  /** Serves GET /metrics and GET /healthz; returns the bound port. */
  async listen(port: number, host = '0.0.0.0'): Promise<number> {
    this.server = http.createServer((req, res) => {
      const path = req.url?.split('?')[0];
      if (req.method === 'GET' && path === '/healthz') {
        let ok = false;
        try {
          ok = this.healthy() === true;
        } catch {
          ok = false;
        }
        res.writeHead(ok ? 200 : 503, { 'content-type': 'text/plain' });
        res.end(ok ? 'SERVING\n' : 'NOT_SERVING\n');
      } else if (req.method === 'GET' && path === '/metrics') {
        this.registry
          .metrics()
          .then((body) => {
            res.writeHead(200, { 'content-type': this.registry.contentType });
            res.end(body);
          })
          .catch((err: Error) => {
            res.writeHead(500);
            res.end(err.message);
          });
      } else {
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end('not found: try /metrics or /healthz\n');
      }
    });
    await new Promise<void>((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(port, host, () => resolve());
    });
    return (this.server.address() as AddressInfo).port;
  }

  async close(): Promise<void> {
    const server = this.server;
    if (!server) return;
    server.closeAllConnections?.();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}
