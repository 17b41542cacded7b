#!/usr/bin/env node
/**
 * A gc lease worker (started by LeaseWorkers, lease-workers.ts): a process of its own,
 * registered with this host's sanlock daemon, that holds volume leases (one group at a time,
 * up to 8 taken in one acquire) for the gc process while that removes the volumes' records. sanlock runs one command per registered
 * process, so several workers are what lets a pass take volume leases in parallel. It exits
 * with the gc (its IPC channel closes); sanlock frees whatever it held then.
 */
import { createLogger, DomainLeases, LeaseHolder, SdmeshError } from '@sdmesh/common/worker';
import { holdVolumesWith } from './lease-groups';
import type { WorkerReply, WorkerRequest } from './lease-workers';

async function main(): Promise<void> {
  const log = createLogger('gc-lease-worker', process.env.SDMESH_LOG_LEVEL ?? 'info', process.env.SDMESH_HOST_NAME ?? '');
  const holder = await LeaseHolder.register({ leaseManagerAddress: process.env.SDMESH_GC_LEASE_MANAGER_ADDRESS ?? '', log });
  const holdVolumes = holdVolumesWith(new DomainLeases(holder));
  const releases = new Map<number, () => void>();
  const send = (reply: WorkerReply) => process.send?.(reply);
  process.on('disconnect', () => process.exit(0));
  process.on('message', (req: WorkerRequest) => {
    if (req.release !== undefined) {
      releases.get(req.release)?.();
      return;
    }
    const hold = req.hold!;
    const held = () =>
      new Promise<void>((resolve) => {
        releases.set(req.id, resolve);
        send({ id: req.id, acquired: true });
      });
    holdVolumes(hold.domain, hold.volumes, hold.operationId, held)
      .then(
        () => send({ id: req.id, released: true }),
        (err: unknown) => {
          const e = SdmeshError.from(err);
          send({ id: req.id, error: { code: e.code, message: e.message, reason: e.reason } });
        },
      )
      .finally(() => releases.delete(req.id));
  });
  send({ id: 0, ready: true });
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
