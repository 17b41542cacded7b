import { createHash } from 'node:crypto';
import { invalidArgument, pb, Reason, type CallContext } from '@sdmesh/common';
import { bounded, toDisk, type CallBound, type Cluster } from './cluster';
import { visibleRecord } from './engine';
import type { DomainEntry } from './domains';
import { checkUuid } from './ids';
import type { OperationIndex, OperationSummary } from './operation-index';
import { isTerminal, type OperationStore } from './operation-store';
import { parseOperationName } from './ids';
import { knownDomain } from './operations/operation';
import { CALL_TIMEOUT_MS } from './policies';

/** The reads of the public API (no operation): domains, disks, operations; paging and filters. */

const MAX_PAGE = 1000;

/** The page size asked for, checked: 0 = the default, more than MAX_PAGE = MAX_PAGE. */
function pageSizeOf(pageSize: number, defaultSize = 100): number {
  if (!Number.isInteger(pageSize) || pageSize < 0) throw invalidArgument(`page_size ${pageSize} must be ≥ 0`, Reason.INVALID_PAGE_SIZE);
  return Math.min(pageSize || defaultSize, MAX_PAGE);
}

export function pageOf<T>(items: T[], pageSize: number, pageToken: string, defaultSize = 100): { page: T[]; next: string } {
  const size = pageSizeOf(pageSize, defaultSize);
  let offset = 0;
  if (pageToken) {
    const m = /^o(\d{1,9})$/.exec(Buffer.from(pageToken, 'base64url').toString());
    if (!m) throw invalidArgument('page_token is not one this API returned', Reason.INVALID_PAGE_TOKEN);
    offset = Number(m[1]);
  }
  const page = items.slice(offset, offset + size);
  const next = offset + size < items.length ? Buffer.from(`o${offset + size}`).toString('base64url') : '';
  return { page, next };
}

export async function listStorageDomains(cluster: Cluster, req: pb.ListStorageDomainsRequest, call: CallBound): Promise<pb.ListStorageDomainsResponse> {
  const { page, next } = pageOf(await cluster.domains.list(), req.pageSize, req.pageToken);
  return { storageDomains: await Promise.all(page.map((d: DomainEntry) => cluster.domainInfo(d, call))), nextPageToken: next };
}

export async function getDisk(cluster: Cluster, req: pb.GetDiskRequest, call: CallBound): Promise<pb.Disk> {
  const entry = await knownDomain({ cluster }, req.storageDomainId);
  return cluster.disk(entry, checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID), call);
}

/**
 * ListDisks: a page of the domain's disks in id order, read from metadata-tx a page at a time
 * (only the page's images are read). The token names the last disk returned, so disks created
 * or deleted between pages do not shift the next one.
 */
export async function listDisks(cluster: Cluster, req: pb.ListDisksRequest, call: CallBound): Promise<pb.ListDisksResponse> {
  const entry = await knownDomain({ cluster }, req.storageDomainId);
  const size = pageSizeOf(req.pageSize);
  const after = req.pageToken ? parseDisksToken(req.pageToken) : '';
  const listed = await cluster.read([], (h) =>
    h.clients.metadata.listImages({ domainPath: entry.path, maxImages: size, afterImageId: after }, bounded(call, CALL_TIMEOUT_MS.listDisks)),
  );
  // A metadata-tx that predates paging answers with every image: page here too.
  const images = listed.images.filter((i) => !after || i.id > after).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const page = images.slice(0, size);
  const more = listed.more || images.length > size;
  return { disks: page.map((i) => toDisk(entry.id, i.id, i.volumes)), nextPageToken: more && page.length ? disksToken(page[page.length - 1]!.id) : '' };
}

const disksToken = (lastDiskId: string) => Buffer.from(`d${lastDiskId}`).toString('base64url');

function parseDisksToken(token: string): string {
  const m = /^d([0-9a-f-]{36})$/.exec(Buffer.from(token, 'base64url').toString());
  if (!m) throw invalidArgument('page_token is not one this API returned', Reason.INVALID_PAGE_TOKEN);
  return m[1]!;
}

/**
 * ListOperations from the replica's operation index (no KV read per record listed): filtered,
 * oldest first (create time, then id), paged by position: the token names the last operation
 * returned and the filter it was made for, so operations that end or are purged between pages
 * do not shift the next page.
 */
export async function listOperations(index: OperationIndex, store: OperationStore, req: pb.ListOperationsRequest): Promise<pb.ListOperationsResponse> {
  const filters = parseFilter(req.filter);
  const size = pageSizeOf(req.pageSize);
  const filterTag = createHash('sha256').update(req.filter.trim()).digest('base64url').slice(0, 8);
  const after = req.pageToken ? parseOperationsToken(req.pageToken, filterTag) : undefined;
  const matching = (await index.currentSummaries())
    .filter((s) => s.purgedMs === undefined && filters.every((f) => f(s)))
    .sort(byCreation)
    .filter((s) => !after || byCreation(s, after) > 0);
  // Read the page's records (a KV get each, in parallel); one purged or deleted meanwhile is left out.
  const page: pb.Operation[] = [];
  let next = 0;
  while (page.length < size && next < matching.length) {
    const chunk = matching.slice(next, next + size - page.length);
    next += chunk.length;
    for (const cur of await Promise.all(chunk.map((s) => store.get(s.id)))) if (cur && cur.rec.purgedMs === undefined) page.push(cur.rec.op);
  }
  return { operations: page, nextPageToken: next < matching.length ? operationsToken(matching[next - 1]!, filterTag) : '' };
}

const byCreation = (a: Pick<OperationSummary, 'createMs' | 'id'>, b: Pick<OperationSummary, 'createMs' | 'id'>) =>
  a.createMs - b.createMs || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

function operationsToken(last: OperationSummary, filterTag: string): string {
  return Buffer.from(`${last.createMs}.${last.id}.${filterTag}`).toString('base64url');
}

function parseOperationsToken(token: string, filterTag: string): Pick<OperationSummary, 'createMs' | 'id'> {
  const m = /^(\d{1,15})\.([0-9a-f-]{36})\.([A-Za-z0-9_-]{8})$/.exec(Buffer.from(token, 'base64url').toString());
  if (!m) throw invalidArgument('page_token is not one this API returned', Reason.INVALID_PAGE_TOKEN);
  if (m[3] !== filterTag) throw invalidArgument('page_token was made for another filter: list again from the first page', Reason.INVALID_PAGE_TOKEN);
  return { createMs: Number(m[1]), id: m[2]! };
}

type OperationFilter = (s: OperationSummary) => boolean;

const FILTER_FIELDS = 'status, type, request_id, disk, domain, target';

/**
 * "status=RUNNING AND type=MOVE_DISK AND disk=<uuid>": terms field=value joined with AND.
 * disk and domain match the operation's target resources (domain: any resource in that
 * domain); target matches one resource name exactly.
 */
export function parseFilter(filter: string): OperationFilter[] {
  if (filter.length > 1000) throw invalidArgument(`filter is ${filter.length} characters long (at most 1000)`, Reason.INVALID_FILTER);
  if (!filter.trim()) return [];
  return filter.split(/\s+AND\s+/i).map((term) => {
    const m = /^\s*(status|type|request_id|disk|domain|target)\s*=\s*"?([A-Za-z0-9_.:/-]+)"?\s*$/.exec(term);
    if (!m) throw invalidArgument(`filter term "${term.slice(0, 60)}" is not field=value (fields: ${FILTER_FIELDS})`, Reason.INVALID_FILTER);
    const [, field, value] = m as unknown as [string, string, string];
    switch (field) {
      case 'status': {
        const s = pb.operationStatusFromJSON(`OPERATION_STATUS_${value.toUpperCase()}`);
        if (s === pb.OperationStatus.UNRECOGNIZED) throw invalidArgument(`unknown status ${value}`, Reason.INVALID_FILTER);
        return (op) => op.status === s;
      }
      case 'type': {
        const t = pb.operationTypeFromJSON(`OPERATION_TYPE_${value.toUpperCase()}`);
        if (t === pb.OperationType.UNRECOGNIZED) throw invalidArgument(`unknown type ${value}`, Reason.INVALID_FILTER);
        return (op) => op.type === t;
      }
      case 'disk': {
        const suffix = `/disks/${checkUuid('filter disk', value, Reason.INVALID_FILTER)}`;
        return (op) => op.targetResources.some((r) => r.endsWith(suffix));
      }
      case 'domain': {
        const resource = `storageDomains/${checkUuid('filter domain', value, Reason.INVALID_FILTER)}`;
        return (op) => op.targetResources.some((r) => r === resource || r.startsWith(`${resource}/`));
      }
      case 'target':
        return (op) => op.targetResources.includes(value);
      default:
        return (op) => op.requestId === value;
    }
  });
}

/**
 * WaitOperation: returns when the operation ends, or after timeout_seconds (default: the call
 * deadline). Woken by the operation index's KV watch, not by polling.
 */
export async function waitOperation(index: OperationIndex, req: pb.WaitOperationRequest, ctx: CallContext): Promise<pb.Operation> {
  const id = parseOperationName(req.name);
  if (!Number.isInteger(req.timeoutSeconds) || req.timeoutSeconds < 0 || req.timeoutSeconds > MAX_WAIT_SECONDS)
    throw invalidArgument(`timeout_seconds ${req.timeoutSeconds} must be 0..${MAX_WAIT_SECONDS}`, Reason.INVALID_TIMEOUT);
  const waitMs = req.timeoutSeconds ? req.timeoutSeconds * 1000 : (ctx.deadline?.getTime() ?? Date.now() + 60_000) - 200 - Date.now();
  const stop = AbortSignal.any([ctx.signal, AbortSignal.timeout(Math.max(0, waitMs))]);
  let current: pb.Operation | undefined;
  for await (const rec of index.changes(id, stop)) {
    current = visibleRecord(id, rec).op;
    if (isTerminal(current.status)) break;
  }
  if (ctx.signal.aborted) throw ctx.signal.reason;
  return current!;
}

/** At most a day: longer waits are a loop of calls (sdmctl ops wait does that). */
const MAX_WAIT_SECONDS = 86_400;

/**
 * WatchOperation: the operation now, then every change until it ends (the index's KV watch; no
 * polling). A write that changes nothing a client sees (the owner's heartbeat) is not sent.
 */
export async function* watchOperation(index: OperationIndex, req: pb.WatchOperationRequest, ctx: CallContext): AsyncIterable<pb.Operation> {
  const id = parseOperationName(req.name);
  let last = '';
  for await (const rec of index.changes(id, ctx.signal)) {
    const op = visibleRecord(id, rec).op;
    const seen = JSON.stringify(pb.Operation.toJSON({ ...op, updateTime: undefined }));
    if (seen === last) continue;
    last = seen;
    yield op;
    if (isTerminal(op.status)) return;
  }
  // Ended by the deadline (or a cancel) before the operation did: say so, not a clean end.
  if (ctx.signal.aborted) throw ctx.signal.reason;
}
