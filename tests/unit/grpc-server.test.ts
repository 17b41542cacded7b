import { status } from '@grpc/grpc-js';
import {
  Authorizer,
  checkHealth,
  createClient,
  createLogger,
  GrpcServer,
  invalidArgument,
  MeshTls,
  pb,
  service,
  ServiceMetrics,
  SdmeshError,
} from '@sdmesh/common/internal';
import { LocalPki } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

// Real mTLS: the server is a host's gc, the client the scheduler (whom the table lets call it).
const dir = makeTestDir('grpc-server');
const pki = new LocalPki(dir);
const serverTls = MeshTls.fromFiles(pki.forIdentity({ kind: 'host', host: 'h1', service: 'gc' }));
const schedulerCredentials = MeshTls.fromFiles(pki.forIdentity({ kind: 'scheduler' })).channelCredentials();
afterAll(() => removeTestDir(dir));

/** What a method the test does not give a handler for answers. */
const notProvided = async (): Promise<never> => {
  throw new SdmeshError(status.UNIMPLEMENTED, 'not provided by this test', 'UNIMPLEMENTED');
};

/** A GcService whose handlers let the test control timing and errors. */
function startServer(handlers: Partial<Parameters<typeof service<typeof pb.GcServiceDefinition>>[1]>) {
  const metrics = new ServiceMetrics('test');
  const server = new GrpcServer({
    serviceName: 'test',
    host: '127.0.0.1',
    port: 0,
    log: createLogger('test', 'silent'),
    metrics,
    tls: serverTls,
    authorizer: new Authorizer({ insecure: false }),
    services: [service(pb.GcServiceDefinition, { collectGarbage: notProvided, getGcStatus: notProvided, listGarbage: notProvided, ...handlers })],
  });
  return { server, metrics };
}

describe('GrpcServer', () => {
  it('serves health, maps SdmeshError to status codes, and counts calls', async () => {
    const { server, metrics } = startServer({
      listGarbage: async (req) => {
        if (!req.domainPath.startsWith('/')) throw invalidArgument(`domain_path must be absolute, got "${req.domainPath}"`, 'INVALID_PATH');
        return { items: [{ relativePath: 'images/_tx_x', kind: 'interrupted-create' }] };
      },
    });
    const port = await server.start();
    const client = createClient(pb.GcServiceDefinition, `127.0.0.1:${port}`, schedulerCredentials);
    try {
      expect(await checkHealth(`127.0.0.1:${port}`, schedulerCredentials)).toBe('SERVING');
      expect(await checkHealth(`127.0.0.1:${port}`, schedulerCredentials, 'sdmesh.v1.GcService')).toBe('SERVING');
      const ok = await client.listGarbage({ domainPath: '/d' });
      expect(ok.items[0]!.kind).toBe('interrupted-create');
      const err = await client.listGarbage({ domainPath: 'rel' }).catch((e: SdmeshError) => e);
      expect(err).toBeInstanceOf(SdmeshError);
      expect((err as SdmeshError).code).toBe(status.INVALID_ARGUMENT);
      expect((err as SdmeshError).reason).toBe('INVALID_PATH');
      const unimpl = await client.getGcStatus({}).catch((e: SdmeshError) => e);
      expect((unimpl as SdmeshError).code).toBe(status.UNIMPLEMENTED);
      const text = await metrics.registry.metrics();
      expect(text).toMatch(/sdmesh_grpc_server_handled_total\{service="test",method="GcService\/ListGarbage",code="INVALID_ARGUMENT"[^}]*\} 1/);
    } finally {
      client.close();
      await server.shutdown(1000);
    }
  });

  it('aborts the handler signal when the deadline passes', async () => {
    // The handler's signal aborts on the server's own clock, which may run behind the client's
    // DEADLINE_EXCEEDED on a busy machine: the test waits for the abort (bounded), not a fixed time.
    let handlerAborted!: (aborted: boolean) => void;
    const sawAbort = new Promise<boolean>((resolve) => (handlerAborted = resolve));
    const { server } = startServer({
      collectGarbage: async (_req, ctx) => {
        await new Promise<void>((resolve) => ctx.signal.addEventListener('abort', () => resolve()));
        handlerAborted(ctx.signal.aborted);
        return { passes: [] };
      },
    });
    const port = await server.start();
    const client = createClient(pb.GcServiceDefinition, `127.0.0.1:${port}`, schedulerCredentials);
    try {
      const err = await client.collectGarbage({}, { timeoutMs: 200 }).catch((e: SdmeshError) => e);
      expect((err as SdmeshError).code).toBe(status.DEADLINE_EXCEEDED);
      expect(await Promise.race([sawAbort, new Promise<string>((r) => setTimeout(() => r('no abort within 20 s'), 20_000).unref())])).toBe(true);
    } finally {
      client.close();
      await server.shutdown(1000);
    }
  });

  it('on shutdown goes NOT_SERVING, refuses new calls and lets in-flight calls finish', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let handlerEntered!: () => void;
    const entered = new Promise<void>((r) => (handlerEntered = r));
    const { server } = startServer({
      collectGarbage: async () => {
        handlerEntered();
        await gate;
        return { passes: [{ domainId: 'finished' }] };
      },
    });
    const port = await server.start();
    const client = createClient(pb.GcServiceDefinition, `127.0.0.1:${port}`, schedulerCredentials);
    const inFlight = client.collectGarbage({});
    // In flight means in the handler: the first call also sets up the mTLS connection, which can
    // take longer than any fixed pause on a busy machine (a call not yet arrived would be refused).
    await entered;
    const shutdown = server.shutdown(5000);
    await new Promise((r) => setTimeout(r, 50));
    const late = await client.listGarbage({ domainPath: '/x' }).catch((e: SdmeshError) => e);
    expect((late as SdmeshError).code).toBe(status.UNAVAILABLE);
    release();
    const res = await inFlight;
    expect(res.passes[0]!.domainId).toBe('finished');
    await shutdown;
    client.close();
  });
});
