import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import type { CallBound, Cluster } from '../cluster';
import { bounded } from '../cluster';
import type { DomainEntry } from '../domains';
import { CALL_TIMEOUT_MS } from '../policies';
import { domainLock, domainResource, registeredDomain, type OperationKind } from './operation';
import { stepCall } from './placed-steps';

/**
 * Remove Storage Domain (only when it holds no disk; the directory stays on storage):
 * `check-empty` → `mark-removing` (before the hosts leave, so a heartbeat in between does not
 * tell them to join again) → `leave-lockspaces` (every healthy host) → `unregister-domain`.
 * Locks: the domain, exclusive (no disk operation runs on it meanwhile).
 */
export interface RemoveStorageDomainParams {
  domainId: string;
}

async function checkEmpty(cluster: Cluster, entry: DomainEntry, bound: CallBound, advice: string): Promise<void> {
  const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, bounded(bound, CALL_TIMEOUT_MS.listImages)));
  if (images.length > 0) throw failedPrecondition(`storage domain ${entry.id} still has ${images.length} disk(s)${advice}`, Reason.DOMAIN_NOT_EMPTY);
}

export const removeStorageDomain: OperationKind<pb.RemoveStorageDomainRequest, RemoveStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_REMOVE_STORAGE_DOMAIN,
  waitForLocks: () => false,

  async prepare(env, req) {
    const entry = await registeredDomain(env, req.storageDomainId);
    await checkEmpty(env.cluster, entry, env.call, ': delete or move them first');
    return { params: { domainId: entry.id }, locks: [domainLock(entry.id, 'exclusive')], targetResources: [domainResource(entry.id)] };
  },

  async run(env, ctx) {
    const entry = await env.cluster.domains.get(ctx.rec.params.domainId);
    await ctx.step('check-empty', async () => {
      await checkEmpty(env.cluster, entry, { signal: ctx.signal }, '');
      return null;
    });
    await ctx.step('mark-removing', async () => {
      await env.cluster.domains.markRemoving(entry.id);
      return null;
    });
    await ctx.step('leave-lockspaces', async () => {
      await Promise.all(
        env.cluster.hosts
          .healthy()
          .map((h) =>
            h.clients.leases
              .leaveLockspace({ lockspace: entry.id, wait: true }, stepCall(ctx, CALL_TIMEOUT_MS.leaveLockspace))
              .catch((err: unknown) => ctx.log.warn({ host: h.spec.name, err: String(err) }, 'leave lockspace failed')),
          ),
      );
      return null;
    });
    await ctx.step('unregister-domain', async () => {
      await env.cluster.domains.remove(entry.id);
      return null;
    });
    return undefined;
  },
};
