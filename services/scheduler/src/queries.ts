import { invalidArgument, pb, Reason, type CallContext } from '@sdmesh/common';
import { bounded, sleep, toDisk, type CallBound, type Cluster } from './cluster';
import type { Engine } from './engine';
import type { DomainEntry } from './domains';
import { checkUuid } from './ids';
import { isTerminal, type OperationStore } from './operation-store';
import { parseOperationName } from './ids';
import { registeredDomain } from './operations/operation';
import { CALL_TIMEOUT_MS } from './policies';

/** The reads of the public API (no operation): domains, disks, operations; paging and filters. */

const MAX_PAGE = 1000;

export function pageOf<T>(items: T[], pageSize: number, pageToken: string, defaultSize = 100): { page: T[]; next: string } {
  if (!Number.isInteger(pageSize) || pageSize < 0) throw invalidArgument(`page_size ${pageSize} must be ≥ 0`, Reason.INVALID_PAGE_SIZE);
  let offset = 0;
  if (pageToken) {
    const m = /^o(\d{1,9})$/.exec(Buffer.from(pageToken, 'base64url').toString());
    if (!m) throw invalidArgument('page_token is not one this API returned', Reason.INVALID_PAGE_TOKEN);
    offset = Number(m[1]);
  }
  const size = Math.min(pageSize || defaultSize, MAX_PAGE);
  const page = items.slice(offset, offset + size);
  const next = offset + size < items.length ? Buffer.from(`o${offset + size}`).toString('base64url') : '';
  return { page, next };
}

export async function listStorageDomains(cluster: Cluster, req: pb.ListStorageDomainsRequest, call: CallBound): Promise<pb.ListStorageDomainsResponse> {
  const { page, next } = pageOf(await cluster.domains.list(), req.pageSize, req.pageToken);
  return { storageDomains: await Promise.all(page.map((d: DomainEntry) => cluster.domainInfo(d, call))), nextPageToken: next };
}

export async function getDisk(cluster: Cluster, req: pb.GetDiskRequest, call: CallBound): Promise<pb.Disk> {
  const entry = await registeredDomain({ cluster }, req.storageDomainId);
  return cluster.disk(entry, checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID), call);
}

export async function listDisks(cluster: Cluster, req: pb.ListDisksRequest, call: CallBound): Promise<pb.ListDisksResponse> {
  const entry = await registeredDomain({ cluster }, req.storageDomainId);
  const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, bounded(call, CALL_TIMEOUT_MS.listDisks)));
  images.sort((a, b) => a.id.localeCompare(b.id));
  const { page, next } = pageOf(images, req.pageSize, req.pageToken);
  return { disks: page.map((i) => toDisk(entry.id, i.id, i.volumes)), nextPageToken: next };
}

export async function listOperations(store: OperationStore, req: pb.ListOperationsRequest): Promise<pb.ListOperationsResponse> {
  const filters = parseFilter(req.filter);
  const all = (await store.list())
    .map((r) => r.op)
    .filter((op) => filters.every((f) => f(op)))
    .sort((a, b) => (a.createTime?.getTime() ?? 0) - (b.createTime?.getTime() ?? 0) || a.name.localeCompare(b.name));
  const { page, next } = pageOf(all, req.pageSize, req.pageToken);
  return { operations: page, nextPageToken: next };
}

/** "status=RUNNING AND type=MOVE_DISK": each term a field=value test. */
export function parseFilter(filter: string): Array<(op: pb.Operation) => boolean> {
  if (!filter.trim()) return [];
  return filter.split(/\s+AND\s+/i).map((term) => {
    const m = /^\s*(status|type|request_id)\s*=\s*"?([A-Za-z0-9_.:-]+)"?\s*$/.exec(term);
    if (!m) throw invalidArgument(`filter term "${term.slice(0, 60)}" is not field=value (fields: status, type, request_id)`, Reason.INVALID_FILTER);
    const [, field, value] = m as unknown as [string, string, string];
    if (field === 'status') {
      const s = pb.operationStatusFromJSON(`OPERATION_STATUS_${value.toUpperCase()}`);
      if (s === pb.OperationStatus.UNRECOGNIZED) throw invalidArgument(`unknown status ${value}`, Reason.INVALID_FILTER);
      return (op) => op.status === s;
    }
    if (field === 'type') {
      const t = pb.operationTypeFromJSON(`OPERATION_TYPE_${value.toUpperCase()}`);
      if (t === pb.OperationType.UNRECOGNIZED) throw invalidArgument(`unknown type ${value}`, Reason.INVALID_FILTER);
      return (op) => op.type === t;
    }
    return (op) => op.requestId === value;
  });
}

/** WaitOperation: returns when the operation ends, or after timeout_seconds (default: the call deadline). */
export async function waitOperation(engine: Engine, req: pb.WaitOperationRequest, ctx: CallContext): Promise<pb.Operation> {
  const id = parseOperationName(req.name);
  if (!Number.isInteger(req.timeoutSeconds) || req.timeoutSeconds < 0)
    throw invalidArgument(`timeout_seconds ${req.timeoutSeconds} must be ≥ 0`, Reason.INVALID_TIMEOUT);
  const until = req.timeoutSeconds ? Date.now() + req.timeoutSeconds * 1000 : (ctx.deadline?.getTime() ?? Date.now() + 60_000) - 200;
  for (;;) {
    const current = await engine.get(id);
    if (isTerminal(current.status) || Date.now() >= until) return current;
    await sleep(Math.min(250, Math.max(0, until - Date.now())), ctx.signal);
  }
}

/** WatchOperation: every change of the operation until it ends (KV polled). */
export async function* watchOperation(engine: Engine, req: pb.WatchOperationRequest, ctx: CallContext): AsyncIterable<pb.Operation> {
  const id = parseOperationName(req.name);
  let last = '';
  for (;;) {
    const current = await engine.get(id);
    const json = JSON.stringify(pb.Operation.toJSON(current));
    if (json !== last) {
      last = json;
      yield current;
    }
    if (isTerminal(current.status)) return;
    await sleep(200, ctx.signal);
  }
}
