import { createHash } from 'node:crypto';
import { invalidArgument } from '@sdmesh/common';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const isUuid = (s: string) => UUID.test(s);

/**
 * How CSI names and ids map onto sdmesh.
 *
 * - volume_id and snapshot_id: `<domain id>/<disk id>` (a snapshot is a template disk).
 * - A CSI name (any characters, at most 128 bytes) is stored on its disk as a label in the
 *   description: `csi-volume <name hash> <request hash> <name, printable>` or
 *   `csi-snapshot <name hash> <source disk id> <name, printable>`. Lookups by name match the
 *   hash; the printable name is for people (sdmctl disks list).
 * - Request ids: `csi-<kind>-<name hash>-<n>`. The scheduler answers a request id with its
 *   operation for days after it ended, so a name deleted and created again needs a new id:
 *   the controller walks n = 1, 2, ... past the operations of earlier incarnations (ended, their
 *   disk gone) and past purged ones (REQUEST_ID_EXPIRED) to the first id without an operation.
 *   Each call submits at most one new operation, so a failing create never runs away.
 */

/** The CSI size limit of a string field. */
export const MAX_NAME_BYTES = 128;

/** Validates a CSI name (CreateVolume.name, CreateSnapshot.name). */
export function checkCsiName(name: string, field = 'name'): string {
  if (!name) throw invalidArgument(`${field} is required`);
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_NAME_BYTES) throw invalidArgument(`${field} is ${bytes} bytes; CSI names are at most ${MAX_NAME_BYTES} bytes`);
  return name;
}

/** 128 bits of SHA-256 in hex: collisions between names are not a practical concern. */
export const nameHash = (name: string) => createHash('sha256').update('csi-name\0').update(name, 'utf8').digest('hex').slice(0, 32);

export type RequestKind = 'volume' | 'snapshot';

/** The request id of the n-th incarnation of a name (n from 1). */
export const requestIdFor = (kind: RequestKind, name: string, n: number) => `csi-${kind}-${nameHash(name)}-${n}`;

/** Hash of what a CreateVolume asked for beyond its name: same name + another hash = ALREADY_EXISTS. */
export function requestHash(fields: Record<string, string | number>): string {
  const canonical = JSON.stringify(
    Object.keys(fields)
      .sort()
      .map((k) => [k, fields[k]]),
  );
  return createHash('sha256').update(canonical).digest('hex').slice(0, 16);
}

export interface VolumeLabel {
  kind: 'csi-volume';
  nameHash: string;
  requestHash: string;
}
export interface SnapshotLabel {
  kind: 'csi-snapshot';
  nameHash: string;
  sourceDiskId: string;
}
export type Label = VolumeLabel | SnapshotLabel;

// Printable: no control characters (the description refuses them), bounded.
const printable = (name: string) => name.replace(/[\u0000-\u001f\u007f-\u009f]/g, '?'); // eslint-disable-line no-control-regex

export function volumeLabel(name: string, reqHash: string): string {
  return `csi-volume ${nameHash(name)} ${reqHash} ${printable(name)}`;
}

export function snapshotLabel(name: string, sourceDiskId: string): string {
  return `csi-snapshot ${nameHash(name)} ${sourceDiskId} ${printable(name)}`;
}

/** The label in a disk's description, or undefined for a disk the CSI driver did not create. */
export function parseLabel(description: string): Label | undefined {
  const [kind, hash, third] = description.split(' ', 3);
  if (!hash || !/^[0-9a-f]{32}$/.test(hash) || !third) return undefined;
  if (kind === 'csi-volume' && /^[0-9a-f]{16}$/.test(third)) return { kind, nameHash: hash, requestHash: third };
  if (kind === 'csi-snapshot' && isUuid(third)) return { kind, nameHash: hash, sourceDiskId: third };
  return undefined;
}

export interface DiskRef {
  domainId: string;
  diskId: string;
}

export const formatId = (ref: DiskRef) => `${ref.domainId}/${ref.diskId}`;

/** A volume or snapshot id, or undefined when it is not one of ours (callers answer NOT_FOUND, or OK for deletes). */
export function parseId(id: string): DiskRef | undefined {
  const parts = id.split('/');
  if (parts.length !== 2 || !isUuid(parts[0]!) || !isUuid(parts[1]!)) return undefined;
  return { domainId: parts[0]!, diskId: parts[1]! };
}

/**
 * Paging tokens of ListVolumes/ListSnapshots: the domain being listed and the scheduler's page
 * token within it, base64url JSON. Anything else is refused by the caller (ABORTED, as CSI says).
 */
export interface ListPosition {
  domainId: string;
  pageToken: string;
}

export const encodeToken = (p: ListPosition) => Buffer.from(JSON.stringify([p.domainId, p.pageToken])).toString('base64url');

export function decodeToken(token: string): ListPosition | undefined {
  try {
    const v: unknown = JSON.parse(Buffer.from(token, 'base64url').toString('utf8'));
    if (Array.isArray(v) && v.length === 2 && typeof v[0] === 'string' && isUuid(v[0]) && typeof v[1] === 'string') return { domainId: v[0], pageToken: v[1] };
  } catch {
    // not JSON: not ours
  }
  return undefined;
}
