import { failedPrecondition, invalidArgument, notFound, pb, Reason } from '@sdmesh/common';
import { sleep } from '../cluster';
import { isActive } from '../domains';
import type { HostState } from '../hosts';
import { leaveEverywhere, startJoining } from './lockspaces';
import { hostLock, hostResource, type OperationKind, type PrepareEnv, type RunEnv } from './operation';

/**
 * Host maintenance, in the manner of oVirt's: StartHostMaintenance `mark-maintenance` (from
 * then on no step is placed on the host, on any replica: the flag is in KV; its epoch is the
 * leave order) → `drain` (waits until the steps running there end: this replica's placements
 * and the data-mover's running and queued jobs, which covers every replica's copies) →
 * `leave-lockspaces` (every registered domain's, until its sanlock holds none) →
 * `in-maintenance`. ActivateHost: `join-lockspaces` (the active domains', with a newer epoch)
 * → `clear-maintenance`. Locks: the host, exclusive.
 */
export interface HostMaintenanceParams {
  host: string;
}

const DRAIN_POLL_MS = 500;

function knownHost(env: Pick<PrepareEnv, 'cluster'>, name: string): HostState {
  if (!name || !/^[A-Za-z0-9._-]{1,64}$/.test(name)) throw invalidArgument('host must be 1..64 characters of [A-Za-z0-9._-]', Reason.INVALID_HOST);
  const h = env.cluster.hosts.get(name);
  if (!h) throw notFound(`host ${name} is not known`, Reason.HOST_NOT_FOUND);
  return h;
}

/** The host's steps and jobs that have not ended (a host whose data-mover is down runs no job). */
const busy = (h: HostState): number => h.inflight + (h.healthy ? h.load.runningJobs + h.load.queuedJobs : 0);

async function drain(env: RunEnv, signal: AbortSignal, name: string): Promise<number> {
  let waitedMs = 0;
  for (;;) {
    const h = env.cluster.hosts.get(name);
    if (!h || busy(h) === 0) return waitedMs;
    await sleep(DRAIN_POLL_MS, signal);
    waitedMs += DRAIN_POLL_MS;
  }
}

export const startHostMaintenance: OperationKind<pb.StartHostMaintenanceRequest, HostMaintenanceParams> = {
  type: pb.OperationType.OPERATION_TYPE_START_HOST_MAINTENANCE,
  waitForLocks: () => false,

  async prepare(env, req) {
    const h = knownHost(env, req.host);
    if (h.maintenance?.state === 'in') throw failedPrecondition(`host ${h.spec.name} is in maintenance already`, Reason.HOST_IN_MAINTENANCE);
    return { params: { host: h.spec.name }, locks: [hostLock(h.spec.name)], targetResources: [hostResource(h.spec.name)] };
  },

  async run(env, ctx) {
    const { host } = ctx.rec.params;
    const hosts = env.cluster.hosts;
    const epochMs = await ctx.step('mark-maintenance', async () => {
      const cur = hosts.get(host)?.maintenance;
      const epoch = cur?.epochMs ?? Date.now();
      await hosts.setMaintenance(host, { state: 'entering', epochMs: epoch });
      return epoch;
    });
    await ctx.step('drain', () => drain(env, ctx.signal, host));
    const h = hosts.get(host);
    if (h) {
      await ctx.step('leave-lockspaces', async () => {
        const domains = await env.cluster.domains.list();
        return leaveEverywhere(
          env,
          ctx,
          domains.map((d) => ({ id: d.id, epochMs })),
          [h],
        );
      });
    }
    await ctx.step('in-maintenance', async () => {
      await hosts.setMaintenance(host, { state: 'in', epochMs });
      env.cluster.publishHostEvent(pb.HostEvent_Kind.KIND_MAINTENANCE, host);
      return null;
    });
    return undefined;
  },
};

export const activateHost: OperationKind<pb.ActivateHostRequest, HostMaintenanceParams> = {
  type: pb.OperationType.OPERATION_TYPE_ACTIVATE_HOST,
  waitForLocks: () => false,

  async prepare(env, req) {
    const h = knownHost(env, req.host);
    if (!h.maintenance) throw failedPrecondition(`host ${h.spec.name} is not in maintenance`, Reason.HOST_ALREADY_ACTIVE);
    return { params: { host: h.spec.name }, locks: [hostLock(h.spec.name)], targetResources: [hostResource(h.spec.name)] };
  },

  async run(env, ctx) {
    const { host } = ctx.rec.params;
    const hosts = env.cluster.hosts;
    const epochMs = await ctx.step('epoch', () => Promise.resolve(Math.max(Date.now(), (hosts.get(host)?.maintenance?.epochMs ?? 0) + 1)));
    // Joined first (a newer order than the maintenance's leave), so the first step placed there finds its lockspaces.
    const h = hosts.get(host);
    if (h) {
      await ctx.step('join-lockspaces', async () => {
        const joined: string[] = [];
        for (const d of (await env.cluster.domains.list()).filter(isActive)) if ((await startJoining(env, ctx, d, epochMs, [h])).length) joined.push(d.id);
        return joined;
      });
    }
    await ctx.step('clear-maintenance', async () => {
      await hosts.setMaintenance(host, undefined);
      return null;
    });
    env.cluster.publishHostEvent(pb.HostEvent_Kind.KIND_ACTIVATED, host);
    return undefined;
  },
};
