import path from 'node:path';
import { invalidArgument, LEASE_MODE, MAX_HOST_ID, pb } from '@sdmesh/common';

/** sanlock's limits: names ≤ 48 bytes, paths ≤ 1024 bytes, 1 MiB lease areas; host ids 1..MAX_HOST_ID (the lease areas' num_hosts). */
export const MAX_NAME_BYTES = 48;
export const MAX_PATH_BYTES = 1023;
export const LEASE_AREA_BYTES = 1024 * 1024;
/** A lease file larger than this is surely a mistake (≈ 1M volume slots of 1 MiB). */
export const MAX_LEASE_OFFSET = 2 ** 40;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

export function checkName(what: string, name: string): string {
  if (!name) throw invalidArgument(`${what} is required`);
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw invalidArgument(`${what} "${name.slice(0, 60)}…" is longer than ${MAX_NAME_BYTES} bytes`);
  if (!NAME_RE.test(name)) throw invalidArgument(`${what} "${name}" may only hold letters, digits, '.', '_' and '-', starting with a letter or digit`);
  return name;
}

export function checkPath(what: string, p: string): string {
  if (!p) throw invalidArgument(`${what} is required`);
  if (p.includes('\0')) throw invalidArgument(`${what} contains a NUL byte`);
  if (!path.isAbsolute(p)) throw invalidArgument(`${what} must be an absolute path, got "${p}"`);
  if (path.normalize(p) !== p) throw invalidArgument(`${what} "${p}" is not normalized (no '..', '.', or '//')`);
  if (Buffer.byteLength(p) > MAX_PATH_BYTES) throw invalidArgument(`${what} is longer than ${MAX_PATH_BYTES} bytes`);
  return p;
}

export function checkOffset(offset: number): number {
  if (!Number.isSafeInteger(offset) || offset < 0) throw invalidArgument(`lease offset must be a non-negative integer, got ${offset}`);
  if (offset % LEASE_AREA_BYTES !== 0) throw invalidArgument(`lease offset ${offset} is not a multiple of the lease area size (${LEASE_AREA_BYTES})`);
  if (offset > MAX_LEASE_OFFSET) throw invalidArgument(`lease offset ${offset} is beyond ${MAX_LEASE_OFFSET}`);
  return offset;
}

export function checkHostId(hostId: number): number {
  if (!Number.isInteger(hostId) || hostId < 1 || hostId > MAX_HOST_ID) throw invalidArgument(`host id must be 1..${MAX_HOST_ID}, got ${hostId}`);
  return hostId;
}

export function checkPid(pid: number): number {
  if (!Number.isInteger(pid) || pid <= 0)
    throw invalidArgument(`holder_pid must be the pid of a process registered with this host's sanlock daemon, got ${pid}`);
  return pid;
}

export function checkIoTimeout(seconds: number): number {
  if (!Number.isInteger(seconds) || seconds < 0 || seconds > 60) throw invalidArgument(`io_timeout_seconds must be 0..60, got ${seconds}`);
  return seconds;
}

export interface LeaseLocation {
  lockspace: string;
  resource: string;
  path: string;
  offset: number;
}

export function checkLocation(loc: pb.LeaseLocation | undefined): LeaseLocation {
  if (!loc) throw invalidArgument('lease location is required');
  return {
    lockspace: checkName('lockspace', loc.lockspace),
    resource: checkName('resource name', loc.resource),
    path: checkPath('lease path', loc.path),
    offset: checkOffset(loc.offset),
  };
}

export const checkMode = (mode: pb.LeaseMode): 'exclusive' | 'shared' => LEASE_MODE.fromPb(mode, 'mode');
