import { GrpcStatus, retry, SdmeshError, type CallOptions, type RetryPolicy } from '@sdmesh/common';
import { bounded, sleep } from '../cluster';
import type { FlowContext, StepRun } from '../engine';
import type { HostState } from '../hosts';
import { isHostUnreachable } from '../policies';
import { requireActive, type RunEnv } from './operation';

/**
 * Step helpers shared by the operations: calls bounded by their timeout and the operation's
 * signal, retries inside a step, and steps sent to a placed host.
 */

/** Options of a call a step makes: its timeout, and aborted with the operation (cancel, shutdown, lost ownership). */
export const stepCall = (ctx: Pick<FlowContext, 'signal'>, timeoutMs: number): CallOptions => bounded({ signal: ctx.signal }, timeoutMs);

/** For deletes: what is already gone counts as deleted. */
export const ignoreNotFound = (err: unknown): void => {
  if (SdmeshError.from(err).code !== GrpcStatus.NOT_FOUND) throw err;
};

/**
 * `retry` inside a step. An aborted operation stops at once with the signal's reason itself
 * (Shutdown and LostOwnership must reach the engine as they are: the operation is left for
 * another replica, not failed), so the wait is the scheduler's own abortable sleep.
 */
export async function retryInStep<T>(ctx: FlowContext<unknown>, policy: RetryPolicy, fn: (attempt: number) => Promise<T>, what: string): Promise<T> {
  try {
    return await retry(policy, fn, {
      sleep: (ms) => sleep(ms, ctx.signal),
      onRetry: (err, attempt, waitMs) => ctx.log.debug({ what, attempt, waitMs, err: String(err) }, 'retrying'),
    });
  } catch (err) {
    if (ctx.signal.aborted) throw ctx.signal.reason;
    throw err;
  }
}

export interface Placement {
  /** Placement kind (metrics, SPM routing): format_domain, create_volume, delete_image. */
  kind: string;
  /** Domains the host must reach. */
  domainIds: string[];
}

/**
 * Runs `fn` on a host chosen for this step (policy `placedStep`): waits while no host fits; a
 * host that does not answer is marked down and the step moves to another one (steps sent
 * this way are idempotent); local lease contention is retried shortly.
 */
export async function onPlacedHost<T>(env: RunEnv, ctx: FlowContext<unknown>, run: StepRun, where: Placement, fn: (h: HostState) => Promise<T>): Promise<T> {
  // An operation that waited for its locks may find a domain deactivated meanwhile: refused, clearly.
  for (const id of where.domainIds) {
    const entry = await env.cluster.domains.find(id);
    if (entry) requireActive(entry);
  }
  const hosts = env.cluster.hosts;
  const excluded = new Set<string>();
  return retryInStep(
    ctx,
    env.policies.placedStep,
    async () => {
      let placed: ReturnType<typeof hosts.place>;
      try {
        placed = hosts.place(where.kind, where.domainIds, excluded);
      } catch (err) {
        // Every healthy host failed this step once: give them another chance.
        if (excluded.size > 0 && hosts.healthy().every((h) => excluded.has(h.spec.name))) excluded.clear();
        throw err;
      }
      try {
        await run.setHost(placed.host.spec.name);
        return await fn(placed.host);
      } catch (err) {
        if (isHostUnreachable(err) && !ctx.signal.aborted) {
          ctx.log.warn({ host: placed.host.spec.name, kind: where.kind, err: String(err) }, 'host did not answer; trying another');
          hosts.markFailed(placed.host.spec.name, String(err));
          excluded.add(placed.host.spec.name);
        }
        throw err;
      } finally {
        placed.done();
      }
    },
    `${where.kind} on a placed host`,
  );
}
