import { invalidArgument, LEASE_MODE, pb, type CallContext, type ServiceHandlers, type StorageRoots } from '@sdmesh/common';
import { checkFormatTarget, holderOf } from './caller';
import { LeaseManager, toPbLocation, toPbMode, type HeldLease } from './lease-manager';
import { checkLocation, checkMode, checkName, checkPath } from './validation';

/** Holder pids are shown only to this host's processes, never over the network. */
const toPbLease = (l: HeldLease, hostId: number, ctx: Pick<CallContext, 'identity'>): pb.Lease =>
  pb.Lease.fromPartial({
    location: toPbLocation(l.location),
    mode: toPbMode(l.mode),
    holderPid: ctx.identity.kind === 'local' ? l.pid : 0,
    operationId: l.operationId,
    lver: l.lver,
    acquireTime: l.acquireTime,
    hostId,
  });

/** gRPC handlers: request validation and message mapping around LeaseManager. */
export function leaseManagerHandlers(manager: LeaseManager, hostId: number, roots?: StorageRoots): ServiceHandlers<typeof pb.LeaseManagerServiceDefinition> {
  return {
    async formatLockspace(req) {
      checkFormatTarget(checkPath('lockspace path', req.path), 'ids', roots);
      await manager.formatLockspace(req.lockspace, req.path, req.maxHosts, req.ioTimeoutSeconds);
      return {
        lockspace: { name: req.lockspace, path: req.path, state: pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED, ioTimeoutSeconds: req.ioTimeoutSeconds },
      };
    },
    async formatLeases(req) {
      checkName('lockspace', req.lockspace);
      checkPath('lease path', req.path);
      if (!req.leases.length) throw invalidArgument('leases: give at least one lease to format');
      if (req.leases.length > 4096) throw invalidArgument('leases: at most 4096 per call');
      const leases = req.leases.map((l) => checkLocation({ ...l, lockspace: l.lockspace || req.lockspace, path: l.path || req.path }));
      for (const path of new Set(leases.map((l) => l.path))) checkFormatTarget(path, 'leases', roots);
      return { written: await manager.formatLeases(leases) };
    },
    async joinLockspace(req, ctx) {
      return manager.joinLockspace({
        name: req.lockspace,
        path: req.path,
        hostId: req.hostId,
        ioTimeout: req.ioTimeoutSeconds,
        wait: req.wait,
        signal: ctx.signal,
        epoch: req.epoch,
      });
    },
    async leaveLockspace(req) {
      return manager.leaveLockspace(req.lockspace, req.wait, req.epoch);
    },
    async getLockspace(req) {
      return manager.lockspaceView(checkName('lockspace', req.lockspace));
    },
    async listLockspaces() {
      return { lockspaces: manager.listLockspaces() };
    },
    async listLockspaceHosts(req) {
      return { hosts: await manager.lockspaceHosts(req.lockspace) };
    },
    async acquireLease(req, ctx) {
      recordNotices(manager, req.released, ctx);
      const lease = await manager.acquire({
        location: checkLocation(req.lease),
        mode: checkMode(req.mode),
        pid: holderOf(ctx, req.holderPid),
        operationId: req.operationId,
        wait: req.wait,
        requestIfHeld: req.requestIfHeld,
        signal: ctx.signal,
      });
      return toPbLease(lease, hostId, ctx);
    },
    // issue 17 (copy fixed cost): several leases in one sanlock acquire.
    async acquireLeases(req, ctx) {
      recordNotices(manager, req.released, ctx);
      const leases = await manager.acquireMany({
        leases: req.leases.map((l, i) => ({ location: checkLocation(l.lease), mode: LEASE_MODE.fromPb(l.mode, `leases[${i}].mode`) })),
        pid: holderOf(ctx, req.holderPid),
        operationId: req.operationId,
        wait: req.wait,
        signal: ctx.signal,
      });
      return { leases: leases.map((l) => toPbLease(l, hostId, ctx)) };
    },
    async releaseLease(req, ctx) {
      const location = checkLocation(req.lease);
      const pid = holderOf(ctx, req.holderPid);
      if (req.releasedByHolder) manager.releasedByHolder(location, pid, grantOf(req));
      else await manager.release(location, pid);
      return {};
    },
    async listHeldLeases(req, ctx) {
      return { leases: manager.heldLeases(req.holderPid).map((l) => toPbLease(l, hostId, ctx)) };
    },
    async getLeaseOwner(req) {
      return manager.leaseOwner(checkLocation(req.lease));
    },
  };
}

/** Releases the caller made itself since its last call (LeaseHolder), sent with an acquire: recorded first. */
function recordNotices(manager: LeaseManager, released: pb.ReleaseLeaseRequest[], ctx: CallContext): void {
  if (released.length > 8) throw invalidArgument('released: at most 8 release notices per acquire');
  for (const r of released) {
    if (!r.releasedByHolder) throw invalidArgument('released: only releases the holder made itself (released_by_holder) can come with an acquire');
    manager.releasedByHolder(checkLocation(r.lease), holderOf(ctx, r.holderPid), grantOf(r));
  }
}

/** The grant a holder's release notice names: required, so that a notice never forgets a newer grant of the same lease. */
function grantOf(notice: pb.ReleaseLeaseRequest): Date {
  if (!notice.acquireTime)
    throw invalidArgument(`a release made by the holder (released_by_holder) must name its grant's acquire_time (lease "${notice.lease?.resource ?? ''}")`);
  return notice.acquireTime;
}
