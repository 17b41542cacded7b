import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import type { ReasonWithCode } from './reasons';

/**
 * The one error type of sdmesh. Every failure a caller can see is an SdmeshError: it
 * carries the gRPC status code, a message a person understands, and a stable reason
 * that programs (and tests) can match on.
 */
export class SdmeshError extends Error {
  constructor(
    readonly code: status,
    message: string,
    readonly reason: string = status[code] ?? 'UNKNOWN',
  ) {
    super(message);
    this.name = 'SdmeshError';
  }

  /** The error as grpc-js sends it; the reason travels in the `sdmesh-reason` trailer. */
  toServiceError(): ServiceError {
    const metadata = new Metadata();
    metadata.set('sdmesh-reason', this.reason);
    return Object.assign(new Error(this.message), {
      code: this.code,
      details: this.message,
      metadata,
    });
  }

  /** Turns an error received from a gRPC call back into an SdmeshError. */
  static fromGrpc(err: unknown): SdmeshError {
    if (err instanceof SdmeshError) return err;
    const e = err as Partial<ServiceError>;
    if (typeof e?.code === 'number') {
      const reason = e.metadata?.get('sdmesh-reason')?.[0];
      return new SdmeshError(e.code, e.details || e.message || status[e.code], typeof reason === 'string' ? reason : undefined);
    }
    return new SdmeshError(status.INTERNAL, err instanceof Error ? err.message : String(err));
  }

  /** Any thrown value as an SdmeshError; unexpected errors become INTERNAL. */
  static from(err: unknown): SdmeshError {
    if (err instanceof SdmeshError) return err;
    if (typeof (err as { code?: unknown })?.code === 'number' && (err as { details?: unknown }).details !== undefined) {
      return SdmeshError.fromGrpc(err);
    }
    return new SdmeshError(status.INTERNAL, `internal error: ${err instanceof Error ? err.message : String(err)}`, 'INTERNAL');
  }
}

// One helper per status code; each accepts only the reasons declared with that code (reasons.ts).
export const invalidArgument = (message: string, reason: ReasonWithCode<status.INVALID_ARGUMENT> = 'INVALID_ARGUMENT') =>
  new SdmeshError(status.INVALID_ARGUMENT, message, reason);
export const notFound = (message: string, reason: ReasonWithCode<status.NOT_FOUND> = 'NOT_FOUND') => new SdmeshError(status.NOT_FOUND, message, reason);
export const alreadyExists = (message: string, reason: ReasonWithCode<status.ALREADY_EXISTS> = 'ALREADY_EXISTS') =>
  new SdmeshError(status.ALREADY_EXISTS, message, reason);
export const failedPrecondition = (message: string, reason: ReasonWithCode<status.FAILED_PRECONDITION> = 'FAILED_PRECONDITION') =>
  new SdmeshError(status.FAILED_PRECONDITION, message, reason);
export const aborted = (message: string, reason: ReasonWithCode<status.ABORTED> = 'ABORTED') => new SdmeshError(status.ABORTED, message, reason);
export const resourceExhausted = (message: string, reason: ReasonWithCode<status.RESOURCE_EXHAUSTED> = 'RESOURCE_EXHAUSTED') =>
  new SdmeshError(status.RESOURCE_EXHAUSTED, message, reason);
export const unavailable = (message: string, reason: ReasonWithCode<status.UNAVAILABLE> = 'UNAVAILABLE') =>
  new SdmeshError(status.UNAVAILABLE, message, reason);
export const deadlineExceeded = (message: string, reason: ReasonWithCode<status.DEADLINE_EXCEEDED> = 'DEADLINE_EXCEEDED') =>
  new SdmeshError(status.DEADLINE_EXCEEDED, message, reason);
export const cancelled = (message: string, reason: ReasonWithCode<status.CANCELLED> = 'CANCELLED') => new SdmeshError(status.CANCELLED, message, reason);
export const internal = (message: string, reason: ReasonWithCode<status.INTERNAL> = 'INTERNAL') => new SdmeshError(status.INTERNAL, message, reason);
export const permissionDenied = (message: string, reason: ReasonWithCode<status.PERMISSION_DENIED> = 'PERMISSION_DENIED') =>
  new SdmeshError(status.PERMISSION_DENIED, message, reason);

export { status as GrpcStatus };
