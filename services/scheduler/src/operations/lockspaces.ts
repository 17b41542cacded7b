import { failedPrecondition, pb, Reason, SdmeshError, unavailable } from '@sdmesh/common';
import { sleep } from '../cluster';
import type { DomainEntry } from '../domains';
import type { FlowContext } from '../engine';
import type { HostState } from '../hosts';
import { CALL_TIMEOUT_MS } from '../policies';
import type { RunEnv } from './operation';
import { stepCall } from './placed-steps';

/** How long a leave step keeps asking hosts that do not answer before it reports them. */
export const LEAVE_STEP_MS = 60_000;
const LEAVE_RETRY_MS = 1000;

/** Every host this replica knows, whatever its health (a host whose data-mover died still has a lockspace to leave). */
export const knownHosts = (env: RunEnv): HostState[] => [...env.cluster.hosts.hosts.values()];

/**
 * The hosts start joining the domain's lockspace now (joining takes ~2·io_timeout), so the
 * first lease on the domain does not pay for it; a host that is down joins from its next
 * heartbeat, or on first use. `epoch` is the order's: a host's lease-manager refuses it if a
 * later order made the host leave. By default every healthy host not in maintenance.
 */
export async function startJoining(
  env: RunEnv,
  ctx: FlowContext<unknown>,
  entry: DomainEntry,
  epochMs: number,
  hosts: HostState[] = env.cluster.hosts.healthy().filter((h) => !h.maintenance),
): Promise<string[]> {
  const joined: string[] = [];
  await Promise.all(
    hosts.map(async (h) => {
      try {
        await h.clients.leases.joinLockspace(
          { lockspace: entry.id, path: env.cluster.idsPath(entry), wait: false, epoch: epochMs },
          stepCall(ctx, CALL_TIMEOUT_MS.startJoiningLockspace),
        );
        joined.push(h.spec.name);
      } catch (err) {
        ctx.log.warn({ host: h.spec.name, domain: entry.id, err: String(err) }, 'could not start joining the lockspace');
      }
    }),
  );
  return joined.sort();
}

/** A host's sanlock no longer holds the lockspace as far as other hosts can tell: its host id is dead or free there. */
const deadThere = (h: HostState, lockspace: string): boolean => {
  const l = h.liveness.get(lockspace);
  return l === pb.HostLiveness.HOST_LIVENESS_DEAD || l === pb.HostLiveness.HOST_LIVENESS_FREE;
};

/**
 * Every given host leaves the lockspaces, waiting until its sanlock has removed each one
 * (rem_lockspace, through its lease-manager, with the order's epoch so that no older order and
 * no join on first use puts it back). A host that does not answer, or still has leases there,
 * is asked again every second for `--lockspace-leave-ms` (LEAVE_STEP_MS); one whose host id sanlock already calls dead
 * counts as gone. What is still left then fails the step UNAVAILABLE LEAVE_INCOMPLETE naming
 * each host and why (the scheduler's host poll keeps telling them to leave when they answer).
 * Returns `host: lockspace` for every leave done.
 */
export async function leaveEverywhere(
  env: RunEnv,
  ctx: FlowContext<unknown>,
  lockspaces: { id: string; epochMs: number }[],
  hosts: HostState[],
): Promise<string[]> {
  const leaveStepMs = env.settings.lockspaceLeaveMs ?? LEAVE_STEP_MS;
  let pending = hosts.flatMap((h) => lockspaces.map((l) => ({ h, l, why: '' })));
  const left: string[] = [];
  const until = Date.now() + leaveStepMs;
  for (;;) {
    await Promise.all(
      pending.map(async (p) => {
        try {
          const ls = await p.h.clients.leases.leaveLockspace(
            { lockspace: p.l.id, wait: true, epoch: p.l.epochMs },
            stepCall(ctx, CALL_TIMEOUT_MS.leaveLockspace),
          );
          if (ls.state !== pb.LockspaceState.LOCKSPACE_STATE_NOT_JOINED) {
            throw failedPrecondition(`the lockspace is still ${String(pb.LockspaceState[ls.state]).replace('LOCKSPACE_STATE_', '')}`, Reason.LEAVE_FAILED);
          }
          p.why = '';
        } catch (err) {
          if (ctx.signal.aborted) throw ctx.signal.reason;
          p.why = deadThere(p.h, p.l.id) ? '' : SdmeshError.from(err).message;
          if (!p.why) ctx.log.warn({ host: p.h.spec.name, lockspace: p.l.id }, 'host does not answer but sanlock calls it dead there: counted as gone');
        }
        if (!p.why) left.push(`${p.h.spec.name}: ${p.l.id}`);
      }),
    );
    pending = pending.filter((p) => p.why);
    if (pending.length === 0) return left.sort();
    if (Date.now() >= until) break;
    await sleep(LEAVE_RETRY_MS, ctx.signal);
  }
  const detail = pending.map((p) => `${p.h.spec.name} (${p.l.id}): ${p.why}`).join('; ');
  throw unavailable(`not every host left the lockspace: ${detail}`, Reason.LEAVE_INCOMPLETE);
}
