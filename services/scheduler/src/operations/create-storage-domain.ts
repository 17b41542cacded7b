import { alreadyExists, invalidArgument, pb, Reason, validateDomainName, validateDomainPath } from '@sdmesh/common';
import { DEFAULT_CRITICAL_FREE_BYTES, DEFAULT_WARNING_FREE_PERCENT, type DomainEntry } from '../domains';
import type { FlowContext } from '../engine';
import { derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { domainLock, domainResource, pathLock, type OperationKind, type RunEnv } from './operation';
import { onPlacedHost, stepCall } from './placed-steps';

/**
 * Create Storage Domain: `format-domain` (metadata-tx on any host; the first domain is formatted
 * on any host even in SPM mode) → `register-domain` (id → path in KV) → `connect-hosts` (every
 * healthy host starts joining the lockspace). Locks: the new domain id and its path, exclusive.
 */
export interface CreateStorageDomainParams {
  domainId: string;
  name: string;
  path: string;
  warningFreePercent: number;
  criticalFreeBytes: number;
}

export const createStorageDomain: OperationKind<pb.CreateStorageDomainRequest, CreateStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_CREATE_STORAGE_DOMAIN,
  waitForLocks: () => false,

  async prepare(env, req, operationId) {
    const name = validateDomainName(req.name);
    const path = validateDomainPath(req.path);
    if (!Number.isFinite(req.warningFreePercent) || req.warningFreePercent < 0 || req.warningFreePercent >= 100) {
      throw invalidArgument(`warning_free_percent ${req.warningFreePercent} must be in 0..100`, Reason.INVALID_THRESHOLD);
    }
    if (!Number.isSafeInteger(req.criticalFreeBytes) || req.criticalFreeBytes < 0) {
      throw invalidArgument(`critical_free_bytes ${req.criticalFreeBytes} must be ≥ 0`, Reason.INVALID_THRESHOLD);
    }
    // Beneath a storage root, not inside or above a known domain (the host checks the storage too).
    const known = await env.cluster.domains.list();
    env.storageRoots.checkNewDomainPath(path, known);
    const taken = known.find((d) => d.path === path);
    if (taken) throw alreadyExists(`${path} is already storage domain ${taken.id}`, Reason.DOMAIN_PATH_IN_USE);
    const domainId = derivedUuid(operationId, 'storage-domain');
    return {
      params: {
        domainId,
        name,
        path,
        warningFreePercent: req.warningFreePercent || DEFAULT_WARNING_FREE_PERCENT,
        criticalFreeBytes: req.criticalFreeBytes || DEFAULT_CRITICAL_FREE_BYTES,
      },
      locks: [domainLock(domainId, 'exclusive'), pathLock(path)],
      targetResources: [domainResource(domainId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    await ctx.step('format-domain', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'format_domain', domainIds: [] }, async (h) => {
        await h.clients.metadata.formatDomain(
          { domainId: p.domainId, name: p.name, path: p.path, ioTimeoutSeconds: env.settings.domainIoTimeoutSeconds },
          stepCall(ctx, CALL_TIMEOUT_MS.formatDomain),
        );
        return null;
      }),
    );
    const entry: DomainEntry = {
      id: p.domainId,
      name: p.name,
      path: p.path,
      warningFreePercent: p.warningFreePercent,
      criticalFreeBytes: p.criticalFreeBytes,
      createTimeMs: ctx.rec.op.createTime?.getTime() ?? Date.now(),
    };
    await ctx.step('register-domain', async () => {
      await env.cluster.domains.put(entry);
      return null;
    });
    await ctx.step('connect-hosts', () => startJoiningEverywhere(env, ctx, entry));
    return { $case: 'storageDomain', storageDomain: await env.cluster.domainInfo(entry) };
  },
};

/**
 * Every healthy host starts joining the lockspace now (joining takes ~2·io_timeout), so the
 * first lease on the domain does not pay for it; a host that is down joins on first use.
 */
async function startJoiningEverywhere(env: RunEnv, ctx: FlowContext<CreateStorageDomainParams>, entry: DomainEntry): Promise<string[]> {
  const joined: string[] = [];
  await Promise.all(
    env.cluster.hosts.healthy().map(async (h) => {
      try {
        await h.clients.leases.joinLockspace(
          { lockspace: entry.id, path: env.cluster.idsPath(entry), wait: false },
          stepCall(ctx, CALL_TIMEOUT_MS.startJoiningLockspace),
        );
        joined.push(h.spec.name);
      } catch (err) {
        ctx.log.warn({ host: h.spec.name, err: String(err) }, 'could not start joining the new lockspace');
      }
    }),
  );
  return joined.sort();
}
