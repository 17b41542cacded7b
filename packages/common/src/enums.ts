import type { status } from '@grpc/grpc-js';
import { invalidArgument } from './errors';
import type { LeaseMode } from './lease-holder';
import * as pb from './lease-proto';
import { Reason, type ReasonWithCode } from './reasons';
import type { LegalityName, VolumeAllocationName, VolumeFormatName } from './storage/records';

/**
 * One table per enum between the wire (ts-proto's numeric enums) and the names sdmesh uses on
 * storage and in code, read in both directions, so a new value is added in one place.
 */
export class EnumMapping<P extends number, N extends string> {
  private readonly byName: Map<N, P>;

  constructor(
    private readonly what: string,
    private readonly byValue: ReadonlyMap<P, N>,
    private readonly reason: ReasonWithCode<status.INVALID_ARGUMENT>,
  ) {
    this.byName = new Map([...byValue].map(([v, n]) => [n, v]));
  }

  toPb(name: N): P {
    return this.byName.get(name)!;
  }

  /** The name of a wire value; an unknown or UNSPECIFIED value is INVALID_ARGUMENT naming the field. */
  fromPb(value: P, field = this.what): N {
    const name = this.byValue.get(value);
    if (name === undefined) throw invalidArgument(`${field}: unknown ${this.what} ${value}`, this.reason);
    return name;
  }

  /** Like fromPb, but UNSPECIFIED (0) gives the default. */
  fromPbOr(value: P, fallback: N, field = this.what): N {
    return value === 0 ? fallback : this.fromPb(value, field);
  }
}

export const VOLUME_FORMAT = new EnumMapping<pb.VolumeFormat, VolumeFormatName>(
  'volume format',
  new Map([
    [pb.VolumeFormat.VOLUME_FORMAT_RAW, 'RAW'],
    [pb.VolumeFormat.VOLUME_FORMAT_QCOW2, 'QCOW2'],
  ]),
  Reason.INVALID_FORMAT,
);

export const VOLUME_ALLOCATION = new EnumMapping<pb.VolumeAllocation, VolumeAllocationName>(
  'volume allocation',
  new Map([
    [pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE, 'SPARSE'],
    [pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED, 'PREALLOCATED'],
  ]),
  Reason.INVALID_ALLOCATION,
);

export const LEGALITY = new EnumMapping<pb.Legality, LegalityName>(
  'legality',
  new Map([
    [pb.Legality.LEGALITY_LEGAL, 'LEGAL'],
    [pb.Legality.LEGALITY_ILLEGAL, 'ILLEGAL'],
  ]),
  Reason.INVALID_LEGALITY,
);

export const LEASE_MODE = new EnumMapping<pb.LeaseMode, LeaseMode>(
  'lease mode',
  new Map([
    [pb.LeaseMode.LEASE_MODE_EXCLUSIVE, 'exclusive'],
    [pb.LeaseMode.LEASE_MODE_SHARED, 'shared'],
  ]),
  Reason.INVALID_ARGUMENT,
);
