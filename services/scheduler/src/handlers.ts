import { createHash } from 'node:crypto';
import {
  alreadyExists,
  describeIdentity,
  failedPrecondition,
  GrpcStatus,
  invalidArgument,
  notFound,
  pb,
  permissionDenied,
  SdmeshError,
  service,
  unavailable,
  validateCapacity,
  validateDescription,
  validateDomainName,
  validateDomainPath,
  type CallContext,
  type ReasonWithCode,
  type RegisteredService,
  type StorageRoots,
} from '@sdmesh/common';
import { sleep, toDisk, type Cluster } from './cluster';
import { DEFAULT_CRITICAL_FREE_BYTES, DEFAULT_WARNING_FREE_PERCENT, type DomainEntry } from './domains';
import type { Engine } from './engine';
import { checkUuid, derivedUuid, parseOperationName } from './ids';
import type { KvStore } from './kv-store';
import type { LockRequest } from './locks';
import { isTerminal, type OperationStore } from './operations';

const T = pb.OperationType;
const MAX_PAGE = 1000;

function pageOf<T>(items: T[], pageSize: number, pageToken: string, defaultSize = 100): { page: T[]; next: string } {
  if (!Number.isInteger(pageSize) || pageSize < 0) throw invalidArgument(`page_size ${pageSize} must be ≥ 0`, 'INVALID_PAGE_SIZE');
  let offset = 0;
  if (pageToken) {
    const m = /^o(\d{1,9})$/.exec(Buffer.from(pageToken, 'base64url').toString());
    if (!m) throw invalidArgument('page_token is not one this API returned', 'INVALID_PAGE_TOKEN');
    offset = Number(m[1]);
  }
  const size = Math.min(pageSize || defaultSize, MAX_PAGE);
  const page = items.slice(offset, offset + size);
  const next = offset + size < items.length ? Buffer.from(`o${offset + size}`).toString('base64url') : '';
  return { page, next };
}

function checkEnum(what: string, value: number, valid: object, reason: ReasonWithCode<GrpcStatus.INVALID_ARGUMENT>): void {
  if (!Object.values(valid).includes(value)) throw invalidArgument(`unknown ${what} ${value}`, reason);
}

const diskLock = (id: string, mode: LockRequest['mode']): LockRequest => ({ entity: `disk:${id}`, mode });
const domainLock = (id: string, mode: LockRequest['mode']): LockRequest => ({ entity: `domain:${id}`, mode });

/** The public API: the four services of scheduler.proto. */
export function schedulerServices(deps: { engine: Engine; store: OperationStore; cluster: Cluster; hostIdKv: KvStore; storageRoots: StorageRoots }): RegisteredService[] {
  const { engine, store, cluster, storageRoots } = deps;
  const domains = cluster.domains;

  const domainOf = async (id: string, what = 'storage_domain_id'): Promise<DomainEntry> => domains.get(checkUuid(what, id, 'INVALID_DOMAIN_ID'));

  const storageDomains = service(pb.StorageDomainServiceDefinition, {
    async createStorageDomain(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_CREATE_STORAGE_DOMAIN,
        requestId,
        request,
        waitForLocks: false,
        async prepare(opId) {
          const name = validateDomainName(req.name);
          const path = validateDomainPath(req.path);
          if (!Number.isFinite(req.warningFreePercent) || req.warningFreePercent < 0 || req.warningFreePercent >= 100) {
            throw invalidArgument(`warning_free_percent ${req.warningFreePercent} must be in 0..100`, 'INVALID_THRESHOLD');
          }
          if (!Number.isSafeInteger(req.criticalFreeBytes) || req.criticalFreeBytes < 0) {
            throw invalidArgument(`critical_free_bytes ${req.criticalFreeBytes} must be ≥ 0`, 'INVALID_THRESHOLD');
          }
          // Beneath a storage root, not inside or above a known domain (the host checks the storage too).
          const known = await domains.list();
          storageRoots.checkNewDomainPath(path, known);
          const taken = known.find((d) => d.path === path);
          if (taken) throw alreadyExists(`${path} is already storage domain ${taken.id}`, 'DOMAIN_PATH_IN_USE');
          const domainId = derivedUuid(opId, 'storage-domain');
          return {
            params: {
              domainId,
              name,
              path,
              warningFreePercent: req.warningFreePercent || DEFAULT_WARNING_FREE_PERCENT,
              criticalFreeBytes: req.criticalFreeBytes || DEFAULT_CRITICAL_FREE_BYTES,
            },
            locks: [domainLock(domainId, 'exclusive'), { entity: `path:${createHash('sha256').update(path).digest('hex').slice(0, 32)}`, mode: 'exclusive' }],
            targetResources: [`storageDomains/${domainId}`],
          };
        },
      });
    },
    async getStorageDomain(req) {
      return cluster.domainInfo(await domainOf(req.storageDomainId));
    },
    async listStorageDomains(req) {
      const { page, next } = pageOf(await domains.list(), req.pageSize, req.pageToken);
      return { storageDomains: await Promise.all(page.map((d) => cluster.domainInfo(d))), nextPageToken: next };
    },
    async removeStorageDomain(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_REMOVE_STORAGE_DOMAIN,
        requestId,
        request,
        waitForLocks: false,
        async prepare() {
          const entry = await domainOf(req.storageDomainId);
          const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, { timeoutMs: 15000 }));
          if (images.length > 0) throw failedPrecondition(`storage domain ${entry.id} still has ${images.length} disk(s): delete or move them first`, 'DOMAIN_NOT_EMPTY');
          return { params: { domainId: entry.id }, locks: [domainLock(entry.id, 'exclusive')], targetResources: [`storageDomains/${entry.id}`] };
        },
      });
    },
  });

  const disks = service(pb.DiskServiceDefinition, {
    async createDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_CREATE_DISK,
        requestId,
        request,
        waitForLocks: req.waitForLocks,
        async prepare(opId) {
          const entry = await domainOf(req.storageDomainId);
          validateCapacity(req.capacityBytes);
          checkEnum('format', req.format, pb.VolumeFormat, 'INVALID_FORMAT');
          checkEnum('allocation', req.allocation, pb.VolumeAllocation, 'INVALID_ALLOCATION');
          const description = validateDescription(req.description);
          const format = req.format || pb.VolumeFormat.VOLUME_FORMAT_RAW;
          const allocation = req.allocation || pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE;
          await cluster.checkSpaceForAllocation(entry, allocation === pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED ? req.capacityBytes : 0);
          const diskId = derivedUuid(opId, 'disk');
          return {
            params: { domainId: entry.id, diskId, volumeId: derivedUuid(opId, 'volume'), capacityBytes: req.capacityBytes, format, allocation, description },
            locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
            targetResources: [`storageDomains/${entry.id}/disks/${diskId}`],
          };
        },
      });
    },
    async getDisk(req) {
      const entry = await domainOf(req.storageDomainId);
      return cluster.disk(entry, checkUuid('disk_id', req.diskId, 'INVALID_DISK_ID'));
    },
    async listDisks(req) {
      const entry = await domainOf(req.storageDomainId);
      const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, { timeoutMs: 30000 }));
      images.sort((a, b) => a.id.localeCompare(b.id));
      const { page, next } = pageOf(images, req.pageSize, req.pageToken);
      return { disks: page.map((i) => toDisk(entry.id, i.id, i.volumes)), nextPageToken: next };
    },
    async deleteDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_DELETE_DISK,
        requestId,
        request,
        waitForLocks: req.waitForLocks,
        async prepare() {
          const entry = await domainOf(req.storageDomainId);
          const diskId = checkUuid('disk_id', req.diskId, 'INVALID_DISK_ID');
          await cluster.volumes(entry, diskId);
          return { params: { domainId: entry.id, diskId }, locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')], targetResources: [`storageDomains/${entry.id}/disks/${diskId}`] };
        },
      });
    },
    async snapshotDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_SNAPSHOT_DISK,
        requestId,
        request,
        waitForLocks: req.waitForLocks,
        async prepare(opId) {
          const entry = await domainOf(req.storageDomainId);
          const diskId = checkUuid('disk_id', req.diskId, 'INVALID_DISK_ID');
          const description = validateDescription(req.description);
          const vols = await cluster.volumes(entry, diskId);
          if (vols.some((v) => v.legality !== pb.Legality.LEGALITY_LEGAL)) throw failedPrecondition(`disk ${diskId} has an ILLEGAL volume`, 'DISK_ILLEGAL');
          await cluster.checkSpaceForAllocation(entry, 0);
          return {
            params: { domainId: entry.id, diskId, volumeId: derivedUuid(opId, 'snapshot-volume'), description },
            locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
            targetResources: [`storageDomains/${entry.id}/disks/${diskId}`],
          };
        },
      });
    },
    async copyDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_COPY_DISK,
        requestId,
        request,
        waitForLocks: req.waitForLocks,
        prepare: (opId) => prepareCopy(opId, req, false),
      });
    },
    async moveDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_MOVE_DISK,
        requestId,
        request,
        waitForLocks: req.waitForLocks,
        prepare: (opId) => prepareCopy(opId, { ...req, collapse: false, targetFormat: pb.VolumeFormat.VOLUME_FORMAT_UNSPECIFIED }, true),
      });
    },
    async importDisk(req) {
      const { requestId, ...request } = req;
      return engine.submit({
        type: T.OPERATION_TYPE_IMPORT_DISK,
        requestId,
        request,
        waitForLocks: false,
        async prepare(opId) {
          const entry = await domainOf(req.storageDomainId);
          checkEnum('format', req.format, pb.VolumeFormat, 'INVALID_FORMAT');
          const description = validateDescription(req.description);
          const sourcePath = validateSourcePath(req.sourcePath);
          if (!req.host) throw invalidArgument('host is required (the host that can read source_path)', 'INVALID_HOST');
          const host = cluster.hosts.get(req.host);
          if (!host) throw notFound(`host ${req.host.slice(0, 64)} is not known`, 'HOST_NOT_FOUND');
          if (!host.healthy) throw unavailable(`host ${host.spec.name} is not healthy right now: the file can only be read there`, 'HOST_UNAVAILABLE');
          if (!cluster.hosts.reaches(host, entry.id)) throw failedPrecondition(`host ${host.spec.name} does not reach storage domain ${entry.id}`, 'HOST_CANNOT_REACH_DOMAIN');
          // Ask the host now, so a missing, unreadable or unsupported file fails the call and
          // nothing is stored (the flow inspects it again).
          const info = await host.clients.mover.inspectFile({ path: sourcePath }, { timeoutMs: 60_000 });
          const capacityBytes = Math.ceil(info.virtualSizeBytes / 512) * 512;
          validateCapacity(capacityBytes);
          await cluster.checkSpaceForAllocation(entry, info.actualSizeBytes);
          const diskId = derivedUuid(opId, 'disk');
          return {
            params: { targetDomainId: entry.id, targetDiskId: diskId, volumeId: derivedUuid(opId, 'volume'), host: host.spec.name, sourcePath, format: req.format, description },
            locks: [diskLock(diskId, 'exclusive'), domainLock(entry.id, 'shared')],
            targetResources: [`storageDomains/${entry.id}/disks/${diskId}`],
          };
        },
      });
    },
  });

  async function prepareCopy(opId: string, req: pb.CopyDiskRequest, move: boolean) {
    const src = await domainOf(req.storageDomainId);
    const dst = await domainOf(req.targetStorageDomainId, 'target_storage_domain_id');
    const diskId = checkUuid('disk_id', req.diskId, 'INVALID_DISK_ID');
    if (move && src.id === dst.id) throw invalidArgument('a disk cannot be moved to the storage domain it is on', 'SAME_DOMAIN');
    checkEnum('target_format', req.targetFormat, pb.VolumeFormat, 'INVALID_FORMAT');
    if (req.targetFormat && !req.collapse) throw invalidArgument('target_format needs collapse (a chain keeps its formats)', 'INVALID_FORMAT');
    const vols = await cluster.volumes(src, diskId);
    const bad = vols.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
    if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${diskId} is ILLEGAL`, 'DISK_ILLEGAL');
    const targetDiskId = move ? diskId : derivedUuid(opId, 'disk');
    if (move) {
      const present = await cluster.volumes(dst, diskId).then(
        () => true,
        (err: unknown) => {
          if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return false;
          throw err;
        },
      );
      if (present) throw alreadyExists(`disk ${diskId} already exists in storage domain ${dst.id}`, 'DISK_EXISTS_IN_TARGET');
    }
    await cluster.checkSpaceForAllocation(dst, 0);
    const volumeIds: Record<string, string> = {};
    for (const v of vols) volumeIds[v.id] = move ? v.id : derivedUuid(opId, `volume:${v.id}`);
    return {
      params: { domainId: src.id, diskId, targetDomainId: dst.id, targetDiskId, collapse: req.collapse, targetFormat: req.targetFormat, volumeIds },
      locks: [diskLock(diskId, move ? 'exclusive' : 'shared'), ...(move ? [] : [diskLock(targetDiskId, 'exclusive')]), domainLock(src.id, 'shared'), domainLock(dst.id, 'shared')],
      targetResources: [`storageDomains/${src.id}/disks/${diskId}`, `storageDomains/${dst.id}/disks/${targetDiskId}`],
    };
  }

  const hosts = service(pb.HostServiceDefinition, {
    async listHosts() {
      return { hosts: [...cluster.hosts.hosts.values()].map((h) => cluster.hosts.toPublic(h)).sort((a, b) => a.name.localeCompare(b.name)) };
    },
    async getHost(req) {
      if (!req.host) throw invalidArgument('host is required', 'INVALID_HOST');
      const h = cluster.hosts.get(req.host);
      if (!h) throw notFound(`host ${req.host.slice(0, 64)} is not known`, 'HOST_NOT_FOUND');
      return cluster.hosts.toPublic(h);
    },
    async heartbeat(req, ctx) {
      if (!req.host) throw invalidArgument('host is required', 'INVALID_HOST');
      const host = pb.Host.fromPartial(req.host);
      // A host speaks only for itself: the name in its certificate is the name it announces.
      if (ctx.identity.kind === 'host' && ctx.identity.host !== host.name) {
        throw permissionDenied(`${describeIdentity(ctx.identity)} may not send heartbeats for host "${host.name.slice(0, 64)}"`, 'WRONG_HOST');
      }
      const hostId = await allocateHostId(deps.hostIdKv, host.name, Object.values(host.hostIds)[0] ?? 0);
      const ids: Record<string, number> = {};
      for (const d of await domains.list()) ids[d.id] = hostId;
      host.hostIds = Object.keys(ids).length ? ids : { '': hostId };
      await cluster.hosts.heartbeat(host);
      // The host joins the lockspaces it has not joined yet (on Kubernetes a new node learns the domains here).
      const domainList = (await domains.list()).filter((d) => !d.removing).map((d) => ({ storageDomainId: d.id, idsPath: cluster.idsPath(d), hostId, ioTimeoutSeconds: 0 }));
      return { hostIds: ids, domains: domainList };
    },
  });

  const operations = service(pb.OperationServiceDefinition, {
    async getOperation(req) {
      return engine.get(parseOperationName(req.name));
    },
    async listOperations(req) {
      const filters = parseFilter(req.filter);
      const all = (await store.list())
        .map((r) => r.op)
        .filter((op) => filters.every((f) => f(op)))
        .sort((a, b) => (a.createTime?.getTime() ?? 0) - (b.createTime?.getTime() ?? 0) || a.name.localeCompare(b.name));
      const { page, next } = pageOf(all, req.pageSize, req.pageToken);
      return { operations: page, nextPageToken: next };
    },
    async cancelOperation(req) {
      return engine.cancel(parseOperationName(req.name));
    },
    async waitOperation(req, ctx) {
      const id = parseOperationName(req.name);
      if (!Number.isInteger(req.timeoutSeconds) || req.timeoutSeconds < 0) throw invalidArgument(`timeout_seconds ${req.timeoutSeconds} must be ≥ 0`, 'INVALID_TIMEOUT');
      const until = req.timeoutSeconds ? Date.now() + req.timeoutSeconds * 1000 : (ctx.deadline?.getTime() ?? Date.now() + 60_000) - 200;
      for (;;) {
        const op = await engine.get(id);
        if (isTerminal(op.status) || Date.now() >= until) return op;
        await sleep(Math.min(250, Math.max(0, until - Date.now())), ctx.signal);
      }
    },
    async *watchOperation(req, ctx: CallContext) {
      const id = parseOperationName(req.name);
      let last = '';
      for (;;) {
        const op = await engine.get(id);
        const json = JSON.stringify(pb.Operation.toJSON(op));
        if (json !== last) {
          last = json;
          yield op;
        }
        if (isTerminal(op.status)) return;
        await sleep(200, ctx.signal);
      }
    },
  });

  return [storageDomains, disks, hosts, operations];
}

/** An import's source path: absolute and normalized (no "." / ".." segments, no double or trailing slash). */
function validateSourcePath(value: string): string {
  const bad = (why: string) => invalidArgument(`source_path ${JSON.stringify(String(value).slice(0, 200))} ${why}`, 'INVALID_PATH');
  if (typeof value !== 'string' || !value) throw invalidArgument('source_path is required', 'INVALID_PATH');
  if (value.length > 4096) throw bad('is too long');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(value)) throw bad('contains control characters');
  if (!value.startsWith('/')) throw bad('is not absolute');
  const segments = value.split('/').slice(1);
  if (segments.includes('..') || segments.includes('.')) throw bad('contains "." or ".." segments');
  if (segments.includes('') || value === '/') throw bad('is not normalized (double or trailing slash)');
  return value;
}

/** "status=RUNNING AND type=MOVE_DISK": each term a field=value test. */
function parseFilter(filter: string): Array<(op: pb.Operation) => boolean> {
  if (!filter.trim()) return [];
  return filter.split(/\s+AND\s+/i).map((term) => {
    const m = /^\s*(status|type|request_id)\s*=\s*"?([A-Za-z0-9_.:-]+)"?\s*$/.exec(term);
    if (!m) throw invalidArgument(`filter term "${term.slice(0, 60)}" is not field=value (fields: status, type, request_id)`, 'INVALID_FILTER');
    const [, field, value] = m as unknown as [string, string, string];
    if (field === 'status') {
      const s = pb.operationStatusFromJSON(`OPERATION_STATUS_${value.toUpperCase()}`);
      if (s === pb.OperationStatus.UNRECOGNIZED) throw invalidArgument(`unknown status ${value}`, 'INVALID_FILTER');
      return (op) => op.status === s;
    }
    if (field === 'type') {
      const t = pb.operationTypeFromJSON(`OPERATION_TYPE_${value.toUpperCase()}`);
      if (t === pb.OperationType.UNRECOGNIZED) throw invalidArgument(`unknown type ${value}`, 'INVALID_FILTER');
      return (op) => op.type === t;
    }
    return (op) => op.requestId === value;
  });
}

/**
 * Host ids without collisions: "hostid.<n>" in KV is created (compare-and-set) with the host
 * name; a host keeps its id; a requested id held by another host is refused.
 */
/** Frees the host id of a forgotten host (see HostRegistry.forgetSilentHosts). */
export async function releaseHostId(kv: KvStore, name: string): Promise<void> {
  for (const k of await kv.keys('hostid')) {
    const e = await kv.get(k);
    if (e?.value === name) await kv.delete(k, e.revision);
  }
}

export async function allocateHostId(kv: KvStore, name: string, wanted: number): Promise<number> {
  if (wanted && (!Number.isInteger(wanted) || wanted < 1 || wanted > 2000)) throw invalidArgument(`host id ${wanted} must be in 1..2000`, 'INVALID_HOST_ID');
  const keys = await kv.keys('hostid');
  for (const k of keys) {
    const e = await kv.get(k);
    if (e?.value === name) {
      const id = Number(k.split('.')[1]);
      if (wanted && wanted !== id) throw failedPrecondition(`host ${name} already has host id ${id}, not ${wanted}`, 'HOST_ID_MISMATCH');
      return id;
    }
  }
  const candidates = wanted ? [wanted] : Array.from({ length: 2000 }, (_, i) => i + 1);
  for (const id of candidates) {
    try {
      await kv.create(`hostid.${id}`, name);
      return id;
    } catch {
      const e = await kv.get(`hostid.${id}`);
      if (e?.value === name) return id;
      if (wanted) throw alreadyExists(`host id ${id} is already used by host ${e?.value ?? 'another host'}`, 'HOST_ID_IN_USE');
    }
  }
  throw failedPrecondition('no free host id (1..2000)', 'NO_FREE_HOST_ID');
}
