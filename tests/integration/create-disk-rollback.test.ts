import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { startService } from '@sdmesh/localmesh';
import { codeOf, MiB, SchedulerMesh } from '../harness/scheduler-mesh';

/**
 * CreateDisk's rollback on a live mesh (one sanlock host, the scheduler, real metadata-tx and
 * files, mTLS gRPC): the host's metadata-tx dies right after its CreateVolume committed (fault point
 * create.after-commit, SIGKILL), so the operation never hears of the commit; it is cancelled,
 * metadata-tx comes back, and the rollback deletes the committed disk: the ABORTED operation
 * leaves no disk listed. And the race the operation fence closes: a create held past its last
 * cancel check (create.before-commit, paused) commits after the cancel; the rollback's fence waits
 * for it, so its look finds the disk and deletes it.
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

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
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

it('a create past its last cancel check commits after the cancel: the rollback fences the operation first, so it finds the disk and deletes it (ABORTED, nothing listed or committed)', async () => {
  const pause = path.join(m.mesh.logDir, 'create-pause');
  await restartMetadataTx({ SDMESH_FAULT_POINT: 'create.before-commit', SDMESH_FAULT_PAUSE_FILE: pause }, 'paused');
  const before = new Set(committedImages());
  const started = await m.api.disks.createDisk({ requestId: 'create-past-cancel', storageDomainId: domain.id, capacityBytes: 4 * MiB });
  // The create is past its checks and its last cancel check, under the domain lease, waiting to rename its _tx_ directory.
  for (const end = Date.now() + 120_000; !fs.existsSync(`${pause}.paused`); await sleep(50))
    if (Date.now() > end) throw new Error('the create never reached create.before-commit');
  expect(fs.readdirSync(imagesDir()).filter((n) => n.startsWith('_tx_'))).toHaveLength(1);

  await m.api.ops.cancelOperation({ name: started.name });
  // Let the rollback run as far as it can while the create waits: without the fence its look finds
  // nothing and the operation ends ABORTED at once; with it, the fence waits for the domain lease.
  let op = await m.api.ops.getOperation({ name: started.name });
  let rollbackSince = 0;
  for (const end = Date.now() + 60_000; Date.now() < end; await sleep(100)) {
    op = await m.api.ops.getOperation({ name: started.name });
    if (op.status === pb.OperationStatus.OPERATION_STATUS_ABORTED) break;
    const rollback = op.steps.find((s) => s.name === 'rollback:delete-disk');
    if (rollback?.status === pb.OperationStatus.OPERATION_STATUS_RUNNING) {
      rollbackSince ||= Date.now();
      if (Date.now() - rollbackSince > 3000) break;
    }
  }
  // The create goes on and commits (its caller is long gone).
  fs.writeFileSync(`${pause}.go`, '');
  op = await m.wait(started.name);
  expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
  expect(op.error?.message).not.toMatch(/rollback incomplete/);
  // Whatever the create did has settled: no transaction directory is left in flight.
  for (const end = Date.now() + 60_000; fs.readdirSync(imagesDir()).some((n) => n.startsWith('_tx_')); await sleep(100)) if (Date.now() > end) break;
  expect(fs.readdirSync(imagesDir()).filter((n) => n.startsWith('_tx_'))).toEqual([]);
  // Nothing committed is left: no new committed image on storage, no disk listed, GetDisk NOT_FOUND.
  expect(committedImages().filter((n) => !before.has(n))).toEqual([]);
  const diskId = op.targetResources[0]!.split('/').pop()!;
  const { disks } = await m.api.disks.listDisks({ storageDomainId: domain.id });
  expect(disks.map((d) => d.id)).not.toContain(diskId);
  expect(await codeOf(m.api.disks.getDisk({ storageDomainId: domain.id, diskId }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
  // The fence is on storage; a create after it (another operation) still works.
  const operationId = started.name.split('/').pop()!;
  expect(fs.readdirSync(path.join(domain.path, 'dom_md')).filter((n) => n.startsWith(`fence_${operationId}_`))).toHaveLength(1);
  await restartMetadataTx({}, 'after-pause');
  // The other order: a create of the operation that arrives after the fence (a late retry, sent as
  // the scheduler over mTLS) is refused ABORTED OPERATION_FENCED and writes nothing.
  const metadata = createClient(
    pb.MetadataTxServiceDefinition,
    m.mesh.hosts[0]!.services['metadata-tx']!.grpcAddress,
    m.mesh.credentials({ kind: 'scheduler' }),
  );
  try {
    const late = { domainPath: domain.path, imageId: diskId, volumeId: '0e0e0e0e-0000-4000-8000-000000000001', capacityBytes: 4 * MiB, operationId };
    expect(await codeOf(metadata.createVolume(late, { timeoutMs: 60_000 }))).toEqual(['ABORTED', 'OPERATION_FENCED']);
  } finally {
    metadata.close();
  }
  expect(committedImages()).not.toContain(diskId);
  expect(fs.readdirSync(imagesDir()).filter((n) => n.startsWith('_tx_'))).toEqual([]);
  const disk = await m.createDisk(domain.id, 4 * MiB, 'create-after-fence');
  expect(disk.legality).toBe(pb.Legality.LEGALITY_LEGAL);
});

it('SnapshotDisk: a snapshot whose commit the scheduler never heard of, then cancelled: the rollback fences and deletes the new leaf (ABORTED, the disk as before)', async () => {
  const disk = await m.createDisk(domain.id, 4 * MiB, 'snapshot-base');
  await restartMetadataTx({ SDMESH_FAULT_POINT: 'create.after-commit' }, 'snapshot-armed');
  const started = await m.api.disks.snapshotDisk({ requestId: 'snapshot-then-die', storageDomainId: domain.id, diskId: disk.id });
  const h = m.mesh.hosts[0]!;
  await h.services['metadata-tx']!.process.exited;
  // The new leaf is committed (its record under its final name) and the operation never heard of it.
  const records = () => fs.readdirSync(path.join(imagesDir(), disk.id)).filter((n) => /^[0-9a-f-]{36}\.meta$/.test(n));
  expect(records()).toHaveLength(2);
  await m.api.ops.cancelOperation({ name: started.name });
  await restartMetadataTx({}, 'snapshot-restarted');
  const op = await m.wait(started.name);
  expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
  expect(op.error?.message).not.toMatch(/rollback incomplete/);
  expect(op.steps.map((s) => s.name)).toEqual(['inspect-disk', 'create-snapshot', 'rollback:delete-snapshot']);
  const after = await m.api.disks.getDisk({ storageDomainId: domain.id, diskId: disk.id });
  expect(after.volumes.map((v) => v.id)).toEqual(disk.volumes.map((v) => v.id));
  expect(records()).toHaveLength(1);
});

it('CopyDisk: a target create past its last cancel check commits after the cancel and the rollback deletes it; a late create of the target after the rollback is refused (ABORTED, nothing committed in the target domain)', async () => {
  const source = await m.createDisk(domain.id, 4 * MiB, 'copy-source');
  const target = await m.createDomain('create-rollback-target');
  const targetImages = () => fs.readdirSync(path.join(target.path, 'images'));
  const pause = path.join(m.mesh.logDir, 'copy-pause');
  await restartMetadataTx({ SDMESH_FAULT_POINT: 'create.before-commit', SDMESH_FAULT_PAUSE_FILE: pause }, 'copy-paused');
  const started = await m.api.disks.copyDisk({
    requestId: 'copy-past-cancel',
    storageDomainId: domain.id,
    diskId: source.id,
    targetStorageDomainId: target.id,
  });
  for (const end = Date.now() + 120_000; !fs.existsSync(`${pause}.paused`); await sleep(50))
    if (Date.now() > end) throw new Error('the target create never reached create.before-commit');
  await m.api.ops.cancelOperation({ name: started.name });
  // As above: without the fence the rollback's delete finds nothing and the operation ends at once.
  let rollbackSince = 0;
  for (const end = Date.now() + 60_000; Date.now() < end; await sleep(100)) {
    const op = await m.api.ops.getOperation({ name: started.name });
    if (op.status === pb.OperationStatus.OPERATION_STATUS_ABORTED) break;
    if (op.steps.find((s) => s.name === 'rollback:delete-target')?.status === pb.OperationStatus.OPERATION_STATUS_RUNNING) {
      rollbackSince ||= Date.now();
      if (Date.now() - rollbackSince > 3000) break;
    }
  }
  fs.writeFileSync(`${pause}.go`, '');
  const op = await m.wait(started.name);
  expect(op.status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
  expect(op.error?.message).not.toMatch(/rollback incomplete/);
  for (const end = Date.now() + 60_000; targetImages().some((n) => n.startsWith('_tx_')); await sleep(100)) if (Date.now() > end) break;
  expect(targetImages().filter((n) => !n.startsWith('_deleted_'))).toEqual([]);
  const { disks } = await m.api.disks.listDisks({ storageDomainId: target.id });
  expect(disks).toEqual([]);
  await restartMetadataTx({}, 'after-copy-pause');
  // The window a one-host mesh shows for a copy: a create of the target that arrives after the
  // rollback's delete (its cancel lost on the way). Sent as the scheduler would: refused, nothing committed.
  const targetDisk = op.targetResources
    .find((r) => r.startsWith(`storageDomains/${target.id}/disks/`))!
    .split('/')
    .pop()!;
  const metadata = createClient(
    pb.MetadataTxServiceDefinition,
    m.mesh.hosts[0]!.services['metadata-tx']!.grpcAddress,
    m.mesh.credentials({ kind: 'scheduler' }),
  );
  try {
    const late = {
      domainPath: target.path,
      imageId: targetDisk,
      volumeId: source.volumes[0]!.id,
      capacityBytes: 4 * MiB,
      operationId: started.name.split('/').pop()!,
      initiallyIllegal: true,
    };
    expect(await codeOf(metadata.createVolume(late, { timeoutMs: 60_000 }))).toEqual(['ABORTED', 'OPERATION_FENCED']);
  } finally {
    metadata.close();
  }
  expect(targetImages().filter((n) => !n.startsWith('_deleted_'))).toEqual([]);
});
