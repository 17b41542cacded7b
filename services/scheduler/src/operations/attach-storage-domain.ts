import { alreadyExists, failedPrecondition, GrpcStatus, MAX_MAX_VOLUMES, notFound, pb, Reason, SdmeshError } from '@sdmesh/common';
import { bounded, orderBaseFirst, type CallBound, type Cluster } from '../cluster';
import { nextEpoch } from '../domains';
import { checkUuid } from '../ids';
import { CALL_TIMEOUT_MS } from '../policies';
import { checkNewDomainPlace, registerAndConnect } from './create-storage-domain';
import { domainLock, domainResource, pathLock, type OperationKind } from './operation';

/**
 * Attach Storage Domain: adopts a formatted domain directory (disaster recovery, or a domain
 * detached with RemoveStorageDomain keep_data). The directory describes itself: its record
 * gives the id and name, its images the disks, so a scheduler with an empty KV recovers the
 * whole inventory from storage. Checked before anything is stored: the path (beneath a storage
 * root, not a registered domain's, not inside or above one), the record (read through a host's
 * metadata-tx, bounded and checksummed: a non-domain directory is NOT_FOUND, an unreadable one
 * FAILED_PRECONDITION DOMAIN_UNREADABLE) and its id (ALREADY_EXISTS DOMAIN_ID_IN_USE when
 * registered). Steps: `inventory` (every disk and its chain read, as a later GetDisk would) →
 * `register-domain` (its own id; the record of an earlier removal is forgotten) → `connect-hosts`.
 * Locks: the domain id and the path, exclusive.
 */
export interface AttachStorageDomainParams {
  domainId: string;
  name: string;
  path: string;
  warningFreePercent: number;
  criticalFreeBytes: number;
  createTimeMs: number;
}

/** The domain at a path as storage describes it; refuses what is not a usable domain. */
async function readDomain(cluster: Cluster, path: string, bound: CallBound): Promise<pb.StorageDomain> {
  let sd: pb.StorageDomain;
  try {
    sd = await cluster.read([], (h) => h.clients.metadata.getDomain({ path }, bounded(bound, CALL_TIMEOUT_MS.getDomain)));
  } catch (err) {
    const e = SdmeshError.from(err);
    if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`${path} is not a storage domain (no dom_md/metadata)`, Reason.DOMAIN_NOT_FOUND);
    throw e;
  }
  if (sd.status !== pb.DomainStatus.DOMAIN_STATUS_ACTIVE) {
    throw failedPrecondition(`${path} can't be attached: ${sd.statusMessage || pb.DomainStatus[sd.status]}`, Reason.DOMAIN_UNREADABLE);
  }
  checkUuid('the domain record', sd.id, Reason.INVALID_DOMAIN_ID);
  // Every volume needs a lease slot: more records than any domain has slots is not a domain we made.
  if (sd.volumeCount > MAX_MAX_VOLUMES) {
    throw failedPrecondition(
      `${path} holds ${sd.volumeCount} volume records, more than a domain has lease slots (${MAX_MAX_VOLUMES})`,
      Reason.DOMAIN_UNREADABLE,
    );
  }
  return sd;
}

export const attachStorageDomain: OperationKind<pb.AttachStorageDomainRequest, AttachStorageDomainParams> = {
  type: pb.OperationType.OPERATION_TYPE_ATTACH_STORAGE_DOMAIN,
  waitForLocks: () => false,

  async prepare(env, req) {
    const { path, ...thresholds } = await checkNewDomainPlace(env, req);
    const sd = await readDomain(env.cluster, path, env.call);
    const registered = await env.cluster.domains.find(sd.id);
    if (registered) throw alreadyExists(`storage domain ${sd.id} (read from ${path}) is registered already, at ${registered.path}`, Reason.DOMAIN_ID_IN_USE);
    return {
      params: { domainId: sd.id, name: sd.name, path, ...thresholds, createTimeMs: sd.createTime?.getTime() ?? Date.now() },
      locks: [domainLock(sd.id, 'exclusive'), pathLock(path)],
      targetResources: [domainResource(sd.id)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    await ctx.step('inventory', async () => {
      const sd = await readDomain(env.cluster, p.path, { signal: ctx.signal });
      if (sd.id !== p.domainId) throw failedPrecondition(`${p.path} now holds domain ${sd.id}, not ${p.domainId}`, Reason.DOMAIN_UNREADABLE);
      const { images } = await env.cluster.read([], (h) =>
        h.clients.metadata.listImages({ domainPath: p.path }, bounded({ signal: ctx.signal }, CALL_TIMEOUT_MS.listImages)),
      );
      const illegal = images.filter((i) => i.volumes.some((v) => v.legality !== pb.Legality.LEGALITY_LEGAL)).map((i) => i.id);
      const volumes = images.reduce((n, i) => n + orderBaseFirst(i.volumes).length, 0);
      ctx.log.info({ domain: p.domainId, disks: images.length, volumes, illegal }, 'attached domain inventory read from storage');
      return { disks: images.length, volumes, illegalDisks: illegal };
    });
    // After the removal order of a detached domain, so that every host's lease-manager takes this join.
    const removed = (await env.cluster.domains.removed()).find((r) => r.id === p.domainId);
    const epochMs = await ctx.step('epoch', () => Promise.resolve(Math.max(nextEpoch(undefined), (removed?.epochMs ?? 0) + 1)));
    const entry = await registerAndConnect(env, ctx, p, p.createTimeMs, epochMs);
    const storageDomain = await env.cluster.domainInfo(entry);
    env.cluster.publishDomainEvent(pb.DomainEvent_Kind.KIND_ATTACHED, storageDomain);
    return { $case: 'storageDomain', storageDomain };
  },
};
