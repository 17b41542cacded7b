import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import type { CallBound, Cluster } from '../cluster';
import { bounded } from '../cluster';
import { epochOf, nextEpoch, type DomainEntry } from '../domains';
import { CALL_TIMEOUT_MS } from '../policies';
import { knownHosts, leaveEverywhere } from './lockspaces';
import { domainLock, domainResource, knownDomain, type OperationKind } from './operation';

/**
 * Remove Storage Domain (the directory always stays on storage): `check-empty` (skipped with
 * keep_data: a detach, the disks stay for a later AttachStorageDomain) → `mark-removing` (before
 * the hosts leave, so a heartbeat in between does not tell them to join again; its epoch is the
 * leave order) → `leave-lockspaces` (every known host, healthy or not, until its sanlock no
 * longer holds the lockspace: LEAVE_INCOMPLETE otherwise, the domain stays flagged) →
 * `unregister-domain` (a record of the removed domain stays, so a host seen in its lockspace
 * later is told to leave). Works on a deactivated domain too. Locks: the domain, exclusive.
 */
export interface RemoveStorageDomainParams {
  domainId: string;
  keepData: boolean;
}

async function checkEmpty(cluster: Cluster, entry: DomainEntry, bound: CallBound, advice: string): Promise<void> {
  const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, bounded(bound, CALL_TIMEOUT_MS.listImages)));
  if (images.length > 0) throw failedPrecondition(`storage domain ${entry.id} still has ${images.length} disk(s)${advice}`, Reason.DOMAIN_NOT_EMPTY);
}

export const removeStorageDomain: OperationKind<pb.RemoveStorageDomainRequest, RemoveStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_REMOVE_STORAGE_DOMAIN,
  waitForLocks: () => false,

  async prepare(env, req) {
    const entry = await knownDomain(env, req.storageDomainId);
    if (!req.keepData) await checkEmpty(env.cluster, entry, env.call, ': delete or move them first, or detach the domain (keep_data)');
    return {
      params: { domainId: entry.id, keepData: req.keepData },
      locks: [domainLock(entry.id, 'exclusive')],
      targetResources: [domainResource(entry.id)],
    };
  },

  async run(env, ctx) {
    const { domainId, keepData } = ctx.rec.params;
    const entry = await env.cluster.domains.find(domainId);
    if (!entry) return undefined; // unregistered by an earlier run of this operation
    if (!keepData) {
      await ctx.step('check-empty', async () => {
        await checkEmpty(env.cluster, entry, { signal: ctx.signal }, '');
        return null;
      });
    }
    const epochMs = await ctx.step('mark-removing', async () => {
      const epoch = entry.removing ? epochOf(entry) : nextEpoch(entry);
      await env.cluster.domains.markRemoving(entry.id, epoch);
      return epoch;
    });
    await ctx.step('leave-lockspaces', () => leaveEverywhere(env, ctx, [{ id: entry.id, epochMs }], knownHosts(env)));
    await ctx.step('unregister-domain', async () => {
      await env.cluster.domains.removeLeavingRecord({ ...entry, removing: true, epochMs });
      env.cluster.publishDomainEvent(pb.DomainEvent_Kind.KIND_REMOVED, pb.StorageDomain.fromPartial({ id: entry.id, name: entry.name, path: entry.path }));
      return null;
    });
    return undefined;
  },
};
