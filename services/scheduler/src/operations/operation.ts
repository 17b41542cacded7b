import { createHash } from 'node:crypto';
import { failedPrecondition, GrpcStatus, invalidArgument, pb, Reason, type ReasonWithCode, type SdmeshError, type StorageRoots } from '@sdmesh/common';
import type { CallBound, Cluster } from '../cluster';
import type { DomainEntry } from '../domains';
import type { FlowContext, OperationResult } from '../engine';
import { checkUuid } from '../ids';
import type { LockRequest } from '../locks';
import type { FlowSettings, RetryPolicies } from '../policies';

/** What an operation's prepare may use: the cluster, and the incoming call's deadline and signal. */
export interface PrepareEnv {
  cluster: Cluster;
  storageRoots: StorageRoots;
  /** The request's deadline and abort signal: every call prepare makes passes them on. */
  call: CallBound;
}

/** What an operation's steps may use. */
export interface RunEnv {
  cluster: Cluster;
  settings: FlowSettings;
  policies: RetryPolicies;
}

/** prepare's answer: the params stored with the operation, the engine locks it takes (as data) and the resources it names. */
export interface Prepared<P> {
  params: P;
  locks: LockRequest[];
  targetResources: string[];
}

/**
 * One kind of operation, in one file (in the manner of vdsm's sdm/api jobs): its typed params
 * P, `prepare` (validation before anything is stored, and the engine locks), `run` (its
 * persisted steps) and `rollback`. Req is the public request message.
 */
export interface OperationKind<Req extends { requestId: string }, P> {
  readonly type: pb.OperationType;
  /** Whether a conflicting request waits for the locks (PENDING) instead of failing LOCKED. */
  waitForLocks(req: Req): boolean;
  prepare(env: PrepareEnv, req: Req, operationId: string): Promise<Prepared<P>>;
  run(env: RunEnv, ctx: FlowContext<P>): Promise<OperationResult>;
  /** Undoes a failed or cancelled run; steps named "rollback:…". */
  rollback?(env: RunEnv, ctx: FlowContext<P>, error: SdmeshError): Promise<void>;
}

/** Any kind, its request and params erased (the engine's table; method parameters are bivariant). */
export type AnyOperationKind = OperationKind<never, unknown>;

// ---------------------------------------------------------------- engine locks, as data

export const diskLock = (id: string, mode: LockRequest['mode']): LockRequest => ({ entity: `disk:${id}`, mode });
export const domainLock = (id: string, mode: LockRequest['mode']): LockRequest => ({ entity: `domain:${id}`, mode });
/** A domain path (hashed: paths may be long): two creations of one directory never run together. */
export const pathLock = (path: string): LockRequest => ({ entity: `path:${createHash('sha256').update(path).digest('hex').slice(0, 32)}`, mode: 'exclusive' });

/** A host (maintenance and activation of one host never run together). */
export const hostLock = (name: string): LockRequest => ({ entity: `host:${name}`, mode: 'exclusive' });

export const diskResource = (domainId: string, diskId: string) => `storageDomains/${domainId}/disks/${diskId}`;
export const hostResource = (name: string) => `hosts/${name}`;
export const domainResource = (domainId: string) => `storageDomains/${domainId}`;

// ---------------------------------------------------------------- validation shared by several operations

/** A registered domain by the id in a request field, whatever its state (reads; domain lifecycle operations). */
export function knownDomain(env: Pick<PrepareEnv, 'cluster'>, id: string, field = 'storage_domain_id'): Promise<DomainEntry> {
  return env.cluster.domains.get(checkUuid(field, id, Reason.INVALID_DOMAIN_ID));
}

/** Refuses a domain that is deactivated (DOMAIN_IN_MAINTENANCE) or being removed (DOMAIN_NOT_ACTIVE). */
export function requireActive(entry: DomainEntry): DomainEntry {
  if (entry.maintenance) {
    throw failedPrecondition(`storage domain ${entry.id} is deactivated (maintenance): activate it first`, Reason.DOMAIN_IN_MAINTENANCE);
  }
  if (entry.removing) throw failedPrecondition(`storage domain ${entry.id} is being removed`, Reason.DOMAIN_NOT_ACTIVE);
  return entry;
}

/** A registered, active domain by the id in a request field: what every disk operation works on. */
export async function registeredDomain(env: Pick<PrepareEnv, 'cluster'>, id: string, field = 'storage_domain_id'): Promise<DomainEntry> {
  return requireActive(await knownDomain(env, id, field));
}

export function checkEnum(field: string, value: number, valid: object, reason: ReasonWithCode<GrpcStatus.INVALID_ARGUMENT>): void {
  if (!Object.values(valid).includes(value)) throw invalidArgument(`unknown ${field} ${value}`, reason);
}

/** Volume capacities are whole 512-byte sectors. */
export { roundUpToSector } from '@sdmesh/common';
