import fs from 'node:fs';
import path from 'node:path';
import { pb } from '@sdmesh/common';
import { startService } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh } from '../harness/scheduler-mesh';

/**
 * CreateDisk's rollback on a live mesh (one sanlock host, the scheduler, real metadata-tx and
 * files): the host's metadata-tx dies right after its CreateVolume committed (fault point
 * create.after-commit, SIGKILL), so the operation never hears of the commit; it is cancelled,
 * metadata-tx comes back, and the rollback deletes the committed disk: the ABORTED operation
 * leaves no disk listed.
 */
jest.setTimeout(300_000);

const m = new SchedulerMesh(1);
let domain: pb.StorageDomain;

beforeAll(async () => {
  await m.start();
  domain = await m.createDomain('create-rollback');
});
afterAll(() => m.stop());

/** Starts host 1's metadata-tx again on its port, with extra environment (e.g. a fault point). */
async function restartMetadataTx(env: NodeJS.ProcessEnv, tag: string): Promise<void> {
  const h = m.mesh.hosts[0]!;
  const old = h.services['metadata-tx']!;
  if (old.process.running()) await old.process.stop('SIGTERM', 10_000);
  await old.process.exited;
  h.services['metadata-tx'] = await startService('metadata-tx', {
    host: h.name,
    env: m.mesh.hostServiceEnv(h, 'metadata-tx', { SDMESH_GRPC_PORT: old.grpcAddress.split(':').pop()!, ...env }),
    logFile: path.join(m.mesh.logDir, `${h.name}-metadata-tx-${tag}.log`),
  });
}

const imagesDir = () => path.join(domain.path, 'images');
const committedImages = () => fs.readdirSync(imagesDir()).filter((n) => !n.startsWith('_'));

it('a create whose commit the scheduler never heard of, then cancelled: the rollback deletes the disk, none listed', async () => {
  const before = new Set(committedImages());
  await restartMetadataTx({ SDMESH_FAULT_POINT: 'create.after-commit' }, 'armed');
  const started = await m.api.disks.createDisk({ requestId: 'create-then-die', storageDomainId: domain.id, capacityBytes: 4 * MiB });

  // metadata-tx committed the image (one rename into images/) and killed itself before answering.
  const h = m.mesh.hosts[0]!;
  await h.services['metadata-tx']!.process.exited;
  const made = committedImages().filter((n) => !before.has(n));
  expect(made).toHaveLength(1);
  const diskId = made[0]!;

  // The operation is still waiting for a host to answer; cancel it, then let metadata-tx come back.
  const cancelling = await m.api.ops.cancelOperation({ name: started.name });
  expect([pb.OperationStatus.OPERATION_STATUS_ABORTING, pb.OperationStatus.OPERATION_STATUS_ABORTED]).toContain(cancelling.status);
  await restartMetadataTx({}, 'restarted');

  const op = await m.wait(started.name);
  expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
  expect(op.error?.message).not.toMatch(/rollback incomplete/);
  // Nothing visible is left: the disk is not listed, GetDisk does not find it, its directory is no longer committed.
  const { disks } = await m.api.disks.listDisks({ storageDomainId: domain.id });
  expect(disks.map((d) => d.id)).not.toContain(diskId);
  expect(await codeOf(m.api.disks.getDisk({ storageDomainId: domain.id, diskId }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
  expect(committedImages()).not.toContain(diskId);
  expect(op.steps.map((s) => s.name)).toEqual(['create-volume', 'rollback:delete-disk']);

  // The domain still works: a create after it is DONE.
  const disk = await m.createDisk(domain.id, 4 * MiB, 'create-after-rollback');
  expect(disk.legality).toBe(pb.Legality.LEGALITY_LEGAL);
});
