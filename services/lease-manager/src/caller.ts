import fs from 'node:fs';
import path from 'node:path';
import { failedPrecondition, permissionDenied, type CallContext, type StorageRoots, Reason } from '@sdmesh/common';
import { LEASE_AREA_BYTES } from './validation';

/** The parent pid of a process, from /proc (undefined when it is gone). */
export function parentPid(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    return Number.isInteger(ppid) ? ppid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The lease holder a call acts for: the calling process itself (its pid from the socket's
 * peer credentials), or a child of it that it names — a data-mover starting a worker, say.
 * A pid the caller merely knows is refused: leases are never taken or released on behalf of
 * another process of the host.
 */
export function holderOf(ctx: Pick<CallContext, 'identity'>, requestedPid: number): number {
  if (ctx.identity.kind !== 'local')
    throw permissionDenied("leases are taken and released only by processes of this host, on the lease-manager's unix socket", Reason.NOT_LOCAL);
  const caller = ctx.identity.pid;
  if (!requestedPid || requestedPid === caller) return caller;
  if (parentPid(requestedPid) === caller) return requestedPid;
  throw permissionDenied(
    `holder_pid ${requestedPid} is neither the calling process (pid ${caller}) nor a child of it: a process may act only for itself and its own children`,
    Reason.NOT_HOLDER,
  );
}

/**
 * Where a lockspace or lease area may be formatted: `<domain>/dom_md/ids` or
 * `<domain>/dom_md/leases`, reached without symbolic links, a regular single-link file if it
 * exists, and (when the host has storage roots) in a domain beneath one of them. Anything
 * else — a host file, a device, a link into one — is refused, so a caller can't make sanlock
 * overwrite it.
 */
export function checkFormatTarget(filePath: string, kind: 'ids' | 'leases', roots?: StorageRoots): void {
  const domMd = path.dirname(filePath);
  if (path.basename(filePath) !== kind || path.basename(domMd) !== 'dom_md') {
    throw permissionDenied(`${filePath}: only a storage domain's dom_md/${kind} can be formatted here`, Reason.NOT_A_DOMAIN_AREA);
  }
  if (roots?.configured) roots.requireUnder(path.dirname(domMd), `the domain of ${filePath}`);
  let real: string;
  try {
    real = fs.realpathSync(domMd);
  } catch {
    throw failedPrecondition(`${domMd} does not exist: format the domain's directories first`, Reason.DOMAIN_AREA_MISSING);
  }
  if (real !== domMd)
    throw permissionDenied(`${domMd} is reached through a symbolic link (it resolves to ${real}); refusing to format it`, Reason.NOT_A_DOMAIN_AREA);
  const st = fs.lstatSync(filePath, { throwIfNoEntry: false });
  if (st && (!st.isFile() || st.nlink !== 1)) {
    throw permissionDenied(`${filePath} is not a regular file with a single link; refusing to format it`, Reason.NOT_A_DOMAIN_AREA);
  }
  if (kind === 'ids' && st && st.size > LEASE_AREA_BYTES) {
    throw permissionDenied(`${filePath} is larger than a lockspace area (${st.size} bytes); refusing to format it`, Reason.NOT_A_DOMAIN_AREA);
  }
}
