import { alreadyExists, invalidArgument, pb, Reason, validateDomainName, validateDomainPath } from '@sdmesh/common';
import { DEFAULT_CRITICAL_FREE_BYTES, DEFAULT_WARNING_FREE_PERCENT, type DomainEntry } from '../domains';
import type { FlowContext } from '../engine';
import { derivedUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { startJoining } from './lockspaces';
import { domainLock, domainResource, pathLock, type OperationKind, type PrepareEnv, type RunEnv } from './operation';
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
    const { path, ...thresholds } = await checkNewDomainPlace(env, req);
    const domainId = derivedUuid(operationId, 'storage-domain');
    return {
      params: { domainId, name, path, ...thresholds },
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
    const createTimeMs = ctx.rec.op.createTime?.getTime() ?? Date.now();
    const entry = await registerAndConnect(env, ctx, p, createTimeMs, createTimeMs);
    return { $case: 'storageDomain', storageDomain: await env.cluster.domainInfo(entry) };
  },
};

/**
 * `register-domain` (id → path in KV, the record of an earlier removal of the id forgotten) →
 * `connect-hosts` (every healthy host starts joining, with the domain's epoch). Returns the entry.
 */
export async function registerAndConnect(
  env: RunEnv,
  ctx: FlowContext<unknown>,
  p: CreateStorageDomainParams,
  createTimeMs: number,
  epochMs: number,
): Promise<DomainEntry> {
  const entry: DomainEntry = {
    id: p.domainId,
    name: p.name,
    path: p.path,
    warningFreePercent: p.warningFreePercent,
    criticalFreeBytes: p.criticalFreeBytes,
    createTimeMs,
    epochMs,
  };
  await ctx.step('register-domain', async () => {
    await env.cluster.domains.put(entry);
    await env.cluster.domains.forgetRemoved(entry.id);
    return null;
  });
  await ctx.step('connect-hosts', () => startJoining(env, ctx, entry, epochMs));
  return entry;
}

/**
 * Where a new or attached domain may be: an absolute path beneath a storage root, not inside or
 * above a known domain (the host checks the storage too), not a registered domain's path; and
 * its free-space thresholds (0 = the defaults).
 */
export async function checkNewDomainPlace(
  env: PrepareEnv,
  req: { path: string; warningFreePercent: number; criticalFreeBytes: number },
): Promise<{ path: string; warningFreePercent: number; criticalFreeBytes: number }> {
  const path = validateDomainPath(req.path);
  if (!Number.isFinite(req.warningFreePercent) || req.warningFreePercent < 0 || req.warningFreePercent >= 100) {
    throw invalidArgument(`warning_free_percent ${req.warningFreePercent} must be in 0..100`, Reason.INVALID_THRESHOLD);
  }
  if (!Number.isSafeInteger(req.criticalFreeBytes) || req.criticalFreeBytes < 0) {
    throw invalidArgument(`critical_free_bytes ${req.criticalFreeBytes} must be ≥ 0`, Reason.INVALID_THRESHOLD);
  }
  const known = await env.cluster.domains.list();
  env.storageRoots.checkNewDomainPath(path, known);
  const taken = known.find((d) => d.path === path);
  if (taken) throw alreadyExists(`${path} is already storage domain ${taken.id}`, Reason.DOMAIN_PATH_IN_USE);
  return {
    path,
    warningFreePercent: req.warningFreePercent || DEFAULT_WARNING_FREE_PERCENT,
    criticalFreeBytes: req.criticalFreeBytes || DEFAULT_CRITICAL_FREE_BYTES,
  };
}
