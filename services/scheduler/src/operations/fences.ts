import { GrpcStatus, type pb, SdmeshError } from '@sdmesh/common';
import type { DomainEntry } from '../domains';
import type { FlowContext, StepRun } from '../engine';
import { CALL_TIMEOUT_MS } from '../policies';
import type { RunEnv } from './operation';
import { onPlacedHost, retryInStep, stepCall } from './placed-steps';

/**
 * Fences this operation in a domain (metadata-tx FenceOperation, under the domain metadata
 * lease) before a rollback looks for what the operation created there: a create of it still on
 * its way to a host, queued there or past its last cancel check either committed before the
 * fence (and the look finds it) or is refused (docs/storage-format.md, "Operation fences").
 * A metadata-tx older than the fence (UNIMPLEMENTED) is logged and the rollback goes on unfenced.
 */
export function fenceOperation(env: RunEnv, ctx: FlowContext<unknown>, run: StepRun, domain: DomainEntry): Promise<void> {
  return onPlacedHost(env, ctx, run, { kind: 'fence_operation', domainIds: [domain.id] }, async (h) => {
    try {
      await h.clients.metadata.fenceOperation({ domainPath: domain.path, operationId: ctx.id }, stepCall(ctx, CALL_TIMEOUT_MS.deleteImage));
    } catch (err) {
      if (SdmeshError.from(err).code !== GrpcStatus.UNIMPLEMENTED) throw err;
      ctx.log.warn({ host: h.spec.name, domain: domain.id }, "the host's metadata-tx cannot fence operations (older version): rolled back without a fence");
    }
  });
}

/** Whether any of these steps was started (only then may a create of the operation be on its way). */
export const anyStepStarted = (ctx: FlowContext<unknown>, names: (name: string) => boolean): boolean => ctx.rec.op.steps.some((s) => names(s.name));

/**
 * A rollback's look (after its fence) at the disk an operation created or changed: its volumes,
 * none when it is gone; tried again while no host answers (policy placedStep).
 */
export function volumesAfterFence(env: RunEnv, ctx: FlowContext<unknown>, domain: DomainEntry, diskId: string, what: string): Promise<pb.Volume[]> {
  return retryInStep(
    ctx,
    env.policies.placedStep,
    () =>
      env.cluster.volumes(domain, diskId).catch((err: unknown) => {
        if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return [];
        throw err;
      }),
    `read disk ${diskId} to roll its ${what} back`,
  );
}
