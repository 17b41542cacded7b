import * as grpc from '@grpc/grpc-js';
import {
  createClient,
  GrpcStatus,
  hasReason,
  pb,
  Reason,
  sameIdentity,
  SdmeshError,
  TLS_CHANNEL_OPTIONS,
  type CallOptions,
  type MeshTls,
  type ServiceClient,
} from '@sdmesh/common';

/** The scheduler's public services, as the controller's certificate (a user with role operator) calls them. */
export interface SchedulerApi {
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  attachments: ServiceClient<typeof pb.DiskAttachmentServiceDefinition>;
  close(): void;
}

export function connectScheduler(address: string, tls: MeshTls): SchedulerApi {
  const creds = tls.channelCredentials(sameIdentity({ kind: 'scheduler' }));
  // One channel shared by the service clients.
  const channel = new grpc.Client(address, creds, TLS_CHANNEL_OPTIONS);
  const opts: grpc.ClientOptions = { channelOverride: channel.getChannel() };
  return {
    domains: createClient(pb.StorageDomainServiceDefinition, address, creds, opts),
    disks: createClient(pb.DiskServiceDefinition, address, creds, opts),
    ops: createClient(pb.OperationServiceDefinition, address, creds, opts),
    attachments: createClient(pb.DiskAttachmentServiceDefinition, address, creds, opts),
    close: () => channel.close(),
  };
}

const ENDED = new Set([pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);
export const hasEnded = (op: pb.Operation) => ENDED.has(op.status);

/** The error an ended operation reports, as the one error type. */
export function operationError(op: pb.Operation): SdmeshError {
  const e = op.error;
  return new SdmeshError(
    e?.code || GrpcStatus.INTERNAL,
    e?.message || `operation ${op.name} ended ${pb.operationStatusToJSON(op.status)}`,
    e?.reason || undefined,
  );
}

/**
 * Waits for an operation to end (WaitOperation in rounds, each within the caller's deadline).
 * DONE returns it; FAILED or ABORTED throws its error. A deadline that passes first throws
 * DEADLINE_EXCEEDED: the CSI caller retries, and the retry finds the same operation.
 */
export async function waitDone(api: SchedulerApi, op: pb.Operation, call: CallOptions): Promise<pb.Operation> {
  let cur = op;
  while (!hasEnded(cur)) {
    const left = call.deadline ? Math.floor((call.deadline.getTime() - Date.now()) / 1000) : 30;
    if (left <= 0)
      throw new SdmeshError(GrpcStatus.DEADLINE_EXCEEDED, `operation ${op.name} is still running; call again to go on waiting`, Reason.DEADLINE_EXCEEDED);
    cur = await api.ops.waitOperation({ name: cur.name, timeoutSeconds: Math.min(30, left) }, call);
  }
  if (cur.status !== pb.OperationStatus.OPERATION_STATUS_DONE) throw operationError(cur);
  return cur;
}

/** The operation of a request id, if the scheduler still lists it. */
export async function findOperation(api: SchedulerApi, requestId: string, call: CallOptions): Promise<pb.Operation | undefined> {
  const { operations } = await api.ops.listOperations({ filter: `request_id=${requestId}`, pageSize: 1 }, call);
  return operations[0];
}

export const isNotFound = (err: unknown) => SdmeshError.from(err).code === GrpcStatus.NOT_FOUND;
export const isRequestIdExpired = (err: unknown) => hasReason(err, Reason.REQUEST_ID_EXPIRED);

/** A disk, or undefined when it (or its domain) does not exist. */
export async function findDisk(api: SchedulerApi, domainId: string, diskId: string, call: CallOptions): Promise<pb.Disk | undefined> {
  try {
    return await api.disks.getDisk({ storageDomainId: domainId, diskId }, call);
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
}
