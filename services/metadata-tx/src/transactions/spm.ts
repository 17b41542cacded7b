/**
 * AcquireSpmLease (SPM mode): this process takes a domain's SPM lease and keeps it until it
 * exits or is fenced. A second request for a domain whose lease we hold is a retry.
 */
import { failedPrecondition, readDomainMetadata, Reason, type CallOptions, type DomainLeases } from '@sdmesh/common';

export class SpmLeases {
  /** The lver of each domain's SPM lease this process holds. */
  private readonly held = new Map<string, number>();

  /** `leases` is absent in single-process mode: then no SPM lease can be taken. */
  constructor(private readonly leases: DomainLeases | undefined) {}

  async acquire(root: string, call: CallOptions): Promise<{ lver: number }> {
    if (!this.leases) throw failedPrecondition('this metadata-tx runs without a lease-manager and cannot hold the SPM lease', Reason.NO_LEASE_MANAGER);
    const md = await readDomainMetadata(root);
    const held = this.held.get(md.domainId);
    if (held !== undefined) return { lver: held }; // already ours: a retry
    const lease = await this.leases.holdSpmLease({ id: md.domainId, path: root }, call);
    this.held.set(md.domainId, lease.lver);
    return { lver: lease.lver };
  }
}
