import { randomUUID } from 'node:crypto';
import { pb } from '@sdmesh/common';
import type { FlagSpec, Parsed } from '../args';
import type { Ctx } from '../context';
import { failed, usageError } from '../exit';
import { follow } from '../follow';
import { json } from '../output';
import { isTerminal, opId, statusName, typeName } from '../render';

export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export const WAIT_FLAG: FlagSpec = {
  name: 'wait',
  short: 'w',
  type: 'bool',
  default: false,
  description: 'Wait for the operation to end, with a live progress bar on a terminal; exit 1 if it fails',
};
export const REQUEST_ID_FLAG: FlagSpec = {
  name: 'request-id',
  type: 'string',
  value: 'ID',
  description: 'Idempotency key: the same id returns the same operation instead of running it twice (default: a new UUID per invocation)',
};
export const DOMAIN_FLAG: FlagSpec = {
  name: 'domain',
  short: 'd',
  type: 'string',
  env: 'SDMCTL_DOMAIN',
  value: 'DOMAIN',
  description: 'Storage domain (id or name)',
};
export const WAIT_FOR_LOCKS_FLAG: FlagSpec = {
  name: 'wait-for-locks',
  type: 'bool',
  default: false,
  description: 'Queue behind conflicting operations instead of failing fast',
};

export const str = (p: Parsed, name: string): string => (p.flags[name] as string | undefined) ?? '';
export const bool = (p: Parsed, name: string): boolean => p.flags[name] === true;

/** A storage domain given by id or by name → its id (names are looked up in the list). */
export async function resolveDomain(ctx: Ctx, ref: string, flag = '--domain'): Promise<string> {
  if (!ref) throw usageError(`${flag} is required (a storage domain id or name)`);
  if (UUID_RE.test(ref)) return ref;
  const all = await listAllDomains(ctx);
  const hits = all.filter((d) => d.name === ref);
  if (hits.length === 1) return hits[0]!.id;
  if (hits.length > 1) throw failed(`${hits.length} storage domains are named "${ref}": use the id (${hits.map((d) => d.id).join(', ')})`);
  throw failed(`no storage domain with id or name "${ref}" (sdmctl domains list shows them)`);
}

export async function listAllDomains(ctx: Ctx): Promise<pb.StorageDomain[]> {
  const out: pb.StorageDomain[] = [];
  let pageToken = '';
  do {
    const res = await ctx.api().domains.listStorageDomains({ pageSize: 1000, pageToken }, ctx.call());
    out.push(...res.storageDomains);
    pageToken = res.nextPageToken;
  } while (pageToken);
  return out;
}

export function requestIdOf(p: Parsed): string {
  const given = str(p, 'request-id');
  if (given && !/^[A-Za-z0-9._:-]{1,128}$/.test(given)) throw usageError('--request-id must be 1..128 characters of A-Z a-z 0-9 . _ : -');
  return given || randomUUID();
}

/**
 * Runs a mutating call (which returns an Operation) and either reports it started or, with
 * --wait, follows it to its end.
 */
export async function submit(ctx: Ctx, p: Parsed, call: (requestId: string) => Promise<pb.Operation>): Promise<number> {
  const op = await call(requestIdOf(p));
  if (bool(p, 'wait')) return follow(ctx, op);
  if (ctx.output === 'json') ctx.out.write(json(pb.Operation.toJSON(op)));
  else {
    ctx.out.write(`${typeName(op.type)} ${statusName(op.status)}: ${op.name}\n`);
    if (!isTerminal(op.status)) ctx.out.write(`follow it: sdmctl ops watch ${opId(op.name)}\n`);
    else if (op.error) ctx.out.write(`error: ${op.error.message}${op.error.reason ? ` [${op.error.reason}]` : ''}\n`);
  }
  const bad = op.status === pb.OperationStatus.OPERATION_STATUS_FAILED || op.status === pb.OperationStatus.OPERATION_STATUS_ABORTED;
  return bad ? 1 : 0;
}

export function enumFlag<T extends number>(value: string, prefix: string, fromJSON: (s: string) => T, flag: string): T {
  if (!value) return 0 as T;
  const v = fromJSON(`${prefix}${value.toUpperCase()}`);
  if ((v as number) === -1) throw usageError(`${flag}: unknown value "${value}"`);
  return v;
}
