import { pb, Reason, failedPrecondition } from '@sdmesh/common';
import { nextEpoch, epochOf } from '../domains';
import { knownHosts, leaveEverywhere } from './lockspaces';
import { domainLock, domainResource, knownDomain, type OperationKind } from './operation';

/**
 * Deactivate Storage Domain (maintenance): waits (PENDING) for the operations running on the
 * domain to end, as it takes the domain's engine lock exclusively; then `mark-maintenance` (no
 * new operation is accepted, and an operation that waited for its locks is refused at its first
 * step, FAILED_PRECONDITION DOMAIN_IN_MAINTENANCE; the flag's epoch is the leave order) →
 * `leave-lockspaces` (every known host, until its sanlock no longer holds the lockspace).
 */
export interface DeactivateStorageDomainParams {
  domainId: string;
}

export const deactivateStorageDomain: OperationKind<pb.DeactivateStorageDomainRequest, DeactivateStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_DEACTIVATE_STORAGE_DOMAIN,
  waitForLocks: () => true,

  async prepare(env, req) {
    const entry = await knownDomain(env, req.storageDomainId);
    if (entry.maintenance) throw failedPrecondition(`storage domain ${entry.id} is deactivated already`, Reason.DOMAIN_IN_MAINTENANCE);
    if (entry.removing) throw failedPrecondition(`storage domain ${entry.id} is being removed`, Reason.DOMAIN_NOT_ACTIVE);
    return { params: { domainId: entry.id }, locks: [domainLock(entry.id, 'exclusive')], targetResources: [domainResource(entry.id)] };
  },

  async run(env, ctx) {
    const entry = await env.cluster.domains.get(ctx.rec.params.domainId);
    const epochMs = await ctx.step('mark-maintenance', async () => {
      const marked = await env.cluster.domains.update(entry.id, (e) => (e.maintenance ? e : { ...e, maintenance: true, epochMs: nextEpoch(e) }));
      return marked ? epochOf(marked) : nextEpoch(entry);
    });
    await ctx.step('leave-lockspaces', () => leaveEverywhere(env, ctx, [{ id: entry.id, epochMs }], knownHosts(env)));
    const storageDomain = await env.cluster.domainInfo({ ...entry, maintenance: true, epochMs });
    env.cluster.publishDomainEvent(pb.DomainEvent_Kind.KIND_DEACTIVATED, storageDomain);
    return { $case: 'storageDomain', storageDomain };
  },
};
