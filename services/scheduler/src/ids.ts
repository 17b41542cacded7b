import { createHash, randomUUID } from 'node:crypto';
import { GrpcStatus, invalidArgument, Reason, type ReasonWithCode } from '@sdmesh/common';

/** A UUID (version 5 layout) derived from a namespace and a name: the same input, the same id. */
export function derivedUuid(namespace: string, name: string): string {
  const h = createHash('sha1').update(namespace).update('\0').update(name).digest();
  h[6] = (h[6]! & 0x0f) | 0x50;
  h[8] = (h[8]! & 0x3f) | 0x80;
  const x = h.subarray(0, 16).toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20, 32)}`;
}

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** The caller's request id, checked; an empty one gets a random id (the call is then not retry-safe). */
export function requestIdOf(requestId: string): string {
  if (!requestId) return randomUUID();
  if (!REQUEST_ID.test(requestId)) {
    throw invalidArgument(`request_id "${requestId.slice(0, 40)}" must be 1..128 characters of [A-Za-z0-9._:-]`, Reason.INVALID_REQUEST_ID);
  }
  return requestId;
}

/** Operation id for a request id: a retry lands on the same operation. */
export const operationIdFor = (requestId: string) => derivedUuid('sdmesh.operation', requestId);

export const operationName = (id: string) => `operations/${id}`;

/** The id in "operations/<id>" (or a bare id), validated. */
export function parseOperationName(name: string): string {
  const id = name.startsWith('operations/') ? name.slice('operations/'.length) : name;
  if (!UUID.test(id)) throw invalidArgument(`"${name.slice(0, 80)}" is not an operation name (operations/<uuid>)`, Reason.INVALID_OPERATION_NAME);
  return id;
}

export function checkUuid(what: string, value: string, reason: ReasonWithCode<GrpcStatus.INVALID_ARGUMENT> = Reason.INVALID_ID): string {
  if (!value) throw invalidArgument(`${what} is required`, reason);
  if (!UUID.test(value)) throw invalidArgument(`${what} "${value.slice(0, 60)}" is not a lowercase UUID`, reason);
  return value;
}

export const isUuid = (v: string) => UUID.test(v);
