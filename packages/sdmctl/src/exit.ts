import { GrpcStatus, SdmeshError } from '@sdmesh/common';

/**
 * sdmctl's exit codes, for shell scripts (documented in docs/sdmctl.md and `sdmctl --help`):
 *   0  success
 *   1  the request or operation failed: the server refused it (not found, precondition,
 *      conflict ...), the operation ended FAILED or ABORTED, or `check` found violations
 *   2  usage error: bad command line, or the server said an argument is invalid
 *   3  server or connection error: the scheduler/NATS could not be reached, the deadline
 *      passed, TLS failed, or the server reported an internal or unimplemented error
 */
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, SERVER: 3 } as const;
export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** An error that ends the command with a given exit code and a one-line message (no stack). */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: ExitCode,
  ) {
    super(message);
    this.name = 'CliError';
  }
}

export const usageError = (message: string) => new CliError(message, EXIT.USAGE);
export const failed = (message: string) => new CliError(message, EXIT.FAILED);

const SERVER_SIDE = new Set<number>([
  GrpcStatus.UNAVAILABLE,
  GrpcStatus.DEADLINE_EXCEEDED,
  GrpcStatus.INTERNAL,
  GrpcStatus.UNKNOWN,
  GrpcStatus.UNIMPLEMENTED,
  GrpcStatus.UNAUTHENTICATED,
  GrpcStatus.CANCELLED,
]);

/** Exit code for a gRPC error received from a server. */
export function exitCodeForGrpc(code: number): ExitCode {
  if (code === GrpcStatus.INVALID_ARGUMENT || code === GrpcStatus.OUT_OF_RANGE) return EXIT.USAGE;
  if (SERVER_SIDE.has(code)) return EXIT.SERVER;
  return EXIT.FAILED;
}

/** The one line a person reads for a server error: its message, then code and reason. */
export function describeGrpcError(err: SdmeshError, server: string): string {
  const code = GrpcStatus[err.code] ?? String(err.code);
  const why = err.reason && err.reason !== code ? `${code}, ${err.reason}` : code;
  if (err.code === GrpcStatus.UNAVAILABLE && /No connection established|ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|Name resolution/i.test(err.message)) {
    // grpc-js appends an often empty "Resolution note:"; a person needs the last error only.
    const detail = err.message
      .replace(/\s*Resolution note:\s*$/, '')
      .replace(/^No connection established\. Last error: (Error: )?/, '')
      .replace(/\.$/, '');
    return `cannot reach ${server}: ${detail}${tlsHint(detail)} [${why}]`;
  }
  if (err.code === GrpcStatus.UNAUTHENTICATED) return `${err.message}: check --tls-cert/--tls-key (SDMESH_TLS_CERT/_KEY) [${why}]`;
  return `${err.message} [${why}]`;
}

/** What a person should check when the TLS handshake itself failed. */
function tlsHint(detail: string): string {
  if (/self[- ]signed|unable to (get|verify)|certificate verify failed|UNABLE_TO_VERIFY|unknown ca/i.test(detail)) {
    return " (the server's certificate is not signed by the CA in --tls-ca / SDMESH_TLS_CA)";
  }
  if (/expired|CERT_HAS_EXPIRED/i.test(detail)) return " (a certificate has expired: renew --tls-cert, or the server's)";
  if (/not the service this client meant to call|without an sdmesh identity/i.test(detail)) return ' (that address is not an sdmesh scheduler)';
  return '';
}

/** Any thrown value → (message, exit code), never a stack trace (SDMCTL_DEBUG=1 adds one). */
export function toExit(err: unknown, server = 'the server'): { message: string; code: ExitCode } {
  if (err instanceof CliError) return { message: err.message, code: err.exitCode };
  if (err instanceof SdmeshError) return { message: describeGrpcError(err, server), code: exitCodeForGrpc(err.code) };
  const e = err as { code?: unknown; details?: unknown; message?: unknown };
  if (typeof e?.code === 'number' && typeof e.details === 'string') {
    const s = SdmeshError.fromGrpc(err);
    return { message: describeGrpcError(s, server), code: exitCodeForGrpc(s.code) };
  }
  if (typeof e?.code === 'string' && /^E[A-Z]+$/.test(e.code)) {
    return { message: String(e.message ?? e.code), code: EXIT.FAILED };
  }
  return { message: `internal error: ${err instanceof Error ? err.message : String(err)}`, code: EXIT.FAILED };
}
