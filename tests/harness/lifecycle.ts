import { execFileSync } from 'node:child_process';
import { pb } from '@sdmesh/common';
import type { MeshHost } from '@sdmesh/localmesh';
import type { PublicApi } from './scheduler-mesh';

/** Helpers of the domain and host lifecycle tests (LocalMesh with heartbeats). */

/**
 * The lockspaces a host's sanlock daemon has, as `sanlock client status` prints them
 * ("s <name>:<host id>:<path>:<offset>", then " ADD" while joining, " REM" while leaving): every
 * one it has in any state, or (`joinedOnly`) those it has fully joined.
 */
export function sanlockLockspaces(h: MeshHost, joinedOnly = false): string[] {
  return execFileSync('sanlock', ['client', 'status'], { env: { ...process.env, ...h.sanlock.env }, encoding: 'utf8' })
    .split('\n')
    .filter((l) => l.startsWith('s ') && (!joinedOnly || !/ (ADD|REM)\s*$/.test(l)))
    .map((l) => l.slice(2).split(':')[0]!);
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls fn until it returns something (errors count as not yet). */
export async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 40_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(300);
  }
}

const ENDED = [pb.OperationStatus.OPERATION_STATUS_DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED];

/** How long an operation took, creation to its last update (ms). */
export const tookMs = (op: pb.Operation): number => (op.updateTime?.getTime() ?? 0) - (op.createTime?.getTime() ?? 0);

/** The operation once it ended. */
export async function operationEnd(api: PublicApi, p: Promise<pb.Operation>): Promise<pb.Operation> {
  const name = (await p).name;
  for (;;) {
    const op = await api.ops.waitOperation({ name, timeoutSeconds: 30 }, { timeoutMs: 40_000 });
    if (ENDED.includes(op.status)) return op;
  }
}

/** The operation once DONE (throws with the operation if it ended otherwise). */
export async function operationDone(api: PublicApi, p: Promise<pb.Operation>): Promise<pb.Operation> {
  const op = await operationEnd(api, p);
  if (op.status !== pb.OperationStatus.OPERATION_STATUS_DONE) throw new Error(`operation failed: ${JSON.stringify(pb.Operation.toJSON(op))}`);
  return op;
}
