import { Metadata, status } from '@grpc/grpc-js';
import { failedPrecondition, invalidArgument, SdmeshError } from '@sdmesh/common';

describe('SdmeshError', () => {
  it('maps to a grpc ServiceError with the reason in a trailer and back', () => {
    const e = failedPrecondition('volume generation is 3, request says 2', 'GENERATION_MISMATCH');
    const wire = e.toServiceError();
    expect(wire.code).toBe(status.FAILED_PRECONDITION);
    expect(wire.details).toBe('volume generation is 3, request says 2');
    expect(wire.metadata.get('sdmesh-reason')).toEqual(['GENERATION_MISMATCH']);
    const back = SdmeshError.fromGrpc(wire);
    expect(back.code).toBe(status.FAILED_PRECONDITION);
    expect(back.reason).toBe('GENERATION_MISMATCH');
    expect(back.message).toBe('volume generation is 3, request says 2');
  });

  it('turns unexpected errors into INTERNAL and keeps SdmeshErrors as they are', () => {
    const internal = SdmeshError.from(new TypeError('boom'));
    expect(internal.code).toBe(status.INTERNAL);
    expect(internal.message).toContain('boom');
    const bad = invalidArgument('size must be positive');
    expect(SdmeshError.from(bad)).toBe(bad);
  });

  it('reads a plain grpc error without an sdmesh reason', () => {
    const raw = Object.assign(new Error('x'), { code: status.UNAVAILABLE, details: 'no connection', metadata: new Metadata() });
    const e = SdmeshError.fromGrpc(raw);
    expect(e.code).toBe(status.UNAVAILABLE);
    expect(e.reason).toBe('UNAVAILABLE');
  });
});
