import { status } from '@grpc/grpc-js';
import { Authorizer, GrpcServer, MeshTls, pb, SdmeshError, service, type Logger, type ServiceMetrics } from '@sdmesh/common/internal';

type LeaseHandlers = Parameters<typeof service<typeof pb.LeaseManagerServiceDefinition>>[1];

/** A logger that keeps the warnings' messages and the audit records, for tests to check. */
export function recordingLog(): { log: Logger; warnings: string[]; audits: unknown[] } {
  const warnings: string[] = [];
  const audits: unknown[] = [];
  const log = {
    child: () => log,
    warn: (_o: unknown, msg: string) => warnings.push(msg),
    info: (o: { audit?: unknown }) => o.audit && audits.push(o.audit),
    debug: () => undefined,
    error: () => undefined,
  } as unknown as Logger;
  return { log, warnings, audits };
}

/**
 * A GrpcServer serving a LeaseManagerService on its gRPC unix socket and its lease frame socket,
 * as the lease-manager does; only the handlers `handlers` gives are served, the rest answer
 * UNIMPLEMENTED. The caller is a local peer (SO_PEERCRED), authorized by the real table.
 */
export function leaseFramesTestServer(opts: {
  grpcSocket: string;
  framesSocket: string;
  handlers: Partial<LeaseHandlers>;
  log: Logger;
  metrics?: ServiceMetrics;
}): GrpcServer {
  const notProvided = async (): Promise<never> => {
    throw new SdmeshError(status.UNIMPLEMENTED, 'not provided by this test', 'UNIMPLEMENTED');
  };
  const handlers = new Proxy({} as LeaseHandlers, { get: (_, key) => opts.handlers[key as keyof LeaseHandlers] ?? notProvided });
  return new GrpcServer({
    serviceName: 'lease-manager',
    host: '127.0.0.1',
    port: 0,
    services: [service(pb.LeaseManagerServiceDefinition, handlers)],
    log: opts.log,
    metrics: opts.metrics,
    tls: MeshTls.insecureMode(),
    authorizer: new Authorizer({ insecure: false }),
    localSocket: opts.grpcSocket,
    leaseFramesSocket: opts.framesSocket,
    tcp: false,
    reflection: false,
  });
}
