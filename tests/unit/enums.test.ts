import { LEASE_MODE, LEGALITY, pb, SdmeshError, VOLUME_ALLOCATION, VOLUME_FORMAT } from '@sdmesh/common';

/** The numeric values of a ts-proto enum, UNSPECIFIED (0) and UNRECOGNIZED (-1) left out. */
const values = (e: object) => Object.values(e).filter((v): v is number => typeof v === 'number' && v > 0);

describe('enum tables', () => {
  it.each([
    ['VolumeFormat', VOLUME_FORMAT, pb.VolumeFormat],
    ['VolumeAllocation', VOLUME_ALLOCATION, pb.VolumeAllocation],
    ['Legality', LEGALITY, pb.Legality],
    ['LeaseMode', LEASE_MODE, pb.LeaseMode],
  ] as const)('%s: every wire value has a name and back', (_what, table, wire) => {
    for (const v of values(wire)) expect(table.toPb(table.fromPb(v as never) as never)).toBe(v);
  });

  it('an unknown or unspecified value is INVALID_ARGUMENT naming the field; fromPbOr fills in the default', () => {
    const err = (() => {
      try {
        VOLUME_FORMAT.fromPb(99 as pb.VolumeFormat, 'target_format');
      } catch (e) {
        return e as SdmeshError;
      }
    })();
    expect([err?.reason, err?.message]).toEqual(['INVALID_FORMAT', 'target_format: unknown volume format 99']);
    expect(() => LEGALITY.fromPb(pb.Legality.LEGALITY_UNSPECIFIED)).toThrow(/unknown legality 0/);
    expect(VOLUME_ALLOCATION.fromPbOr(pb.VolumeAllocation.VOLUME_ALLOCATION_UNSPECIFIED, 'SPARSE')).toBe('SPARSE');
  });
});
