import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import { bounded } from '../cluster';
import { epochOf, nextEpoch } from '../domains';
import { CALL_TIMEOUT_MS } from '../policies';
import { startJoining } from './lockspaces';
import { domainLock, domainResource, knownDomain, type OperationKind } from './operation';

/**
 * Activate Storage Domain (back from maintenance): `check-storage` (the domain must read as a
 * valid domain with its own id) → `mark-active` (a new epoch: the join order that overrides the
 * deactivation's leave order on every host) → `connect-hosts` (every healthy host not in
 * maintenance starts joining; a host that missed it joins from its next heartbeat or on first use).
 */
export interface ActivateStorageDomainParams {
  domainId: string;
}

export const activateStorageDomain: OperationKind<pb.ActivateStorageDomainRequest, ActivateStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_ACTIVATE_STORAGE_DOMAIN,
  waitForLocks: () => false,

  async prepare(env, req) {
    const entry = await knownDomain(env, req.storageDomainId);
    if (entry.removing) throw failedPrecondition(`storage domain ${entry.id} is being removed`, Reason.DOMAIN_NOT_ACTIVE);
    if (!entry.maintenance) throw failedPrecondition(`storage domain ${entry.id} is active already`, Reason.DOMAIN_ALREADY_ACTIVE);
    return { params: { domainId: entry.id }, locks: [domainLock(entry.id, 'exclusive')], targetResources: [domainResource(entry.id)] };
  },

  async run(env, ctx) {
    const entry = await env.cluster.domains.get(ctx.rec.params.domainId);
    await ctx.step('check-storage', async () => {
      const sd = await env.cluster.read([], (h) =>
        h.clients.metadata.getDomain({ path: entry.path }, bounded({ signal: ctx.signal }, CALL_TIMEOUT_MS.getDomain)),
      );
      if (sd.status !== pb.DomainStatus.DOMAIN_STATUS_ACTIVE || sd.id !== entry.id) {
        const what = sd.status !== pb.DomainStatus.DOMAIN_STATUS_ACTIVE ? sd.statusMessage : `it now holds domain ${sd.id}`;
        throw failedPrecondition(`storage domain ${entry.id} at ${entry.path} can't be activated: ${what}`, Reason.DOMAIN_UNREADABLE);
      }
      return null;
    });
    const epochMs = await ctx.step('mark-active', async () => {
      const marked = await env.cluster.domains.update(entry.id, (e) => (e.maintenance ? { ...e, maintenance: false, epochMs: nextEpoch(e) } : e));
      return marked ? epochOf(marked) : nextEpoch(entry);
    });
    const active = { ...entry, maintenance: false, epochMs };
    await ctx.step('connect-hosts', () => startJoining(env, ctx, active, epochMs));
    const storageDomain = await env.cluster.domainInfo(active);
    env.cluster.publishDomainEvent(pb.DomainEvent_Kind.KIND_ACTIVATED, storageDomain);
    return { $case: 'storageDomain', storageDomain };
  },
};
