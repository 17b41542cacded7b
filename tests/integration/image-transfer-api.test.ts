import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import path from 'node:path';
import fs from 'node:fs';
import https from 'node:https';
import { createClient, pb, type ServiceClient } from '@sdmesh/common';
import type { RunningService } from '@sdmesh/localmesh';
import { waitFor } from '../harness/lifecycle';
import { REPO_ROOT } from '../harness/paths';
import { codeOf, MiB, refusalOf, SchedulerMesh, type PublicApi } from '../harness/scheduler-mesh';

/**
 * The image transfer control plane (docs/image-transfer.md, "API and lifecycle") on a real mesh:
 * 2 sanlock hosts, the scheduler, the data-movers' HTTPS endpoints; bytes moved over real HTTPS
 * with the user's certificate. Start → READY (upload: the disk ILLEGAL) → PUT/GET → Finalize
 * (upload: LEGAL, generation + 2 in all); refusals before anything is stored; cancel, inactivity
 * and a killed data-mover roll back, and an upload's disk is never seen LEGAL with partial data.
 */
jest.setTimeout(900_000);

const UPLOAD = pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD;
const DOWNLOAD = pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD;
const SIZE = 8 * MiB;
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');

describe('image transfer API', () => {
  const m = new SchedulerMesh(2);
  let domain: pb.StorageDomain;
  let disk: pb.Disk;
  let qcow: pb.Disk;
  let tls: { ca: Buffer; cert: Buffer; key: Buffer };
  let transfers: ServiceClient<typeof pb.ImageTransferServiceDefinition>;
  let operatorTransfers: ServiceClient<typeof pb.ImageTransferServiceDefinition>;
  let seq = 0;
  let second: RunningService;
  let api2: PublicApi;
  let transfers2: ServiceClient<typeof pb.ImageTransferServiceDefinition>;

  beforeAll(async () => {
    await m.start();
    const admin = m.mesh.pki.forIdentity({ kind: 'user', name: 'admin' });
    tls = { ca: fs.readFileSync(admin.ca), cert: fs.readFileSync(admin.cert), key: fs.readFileSync(admin.key) };
    transfers = createClient(pb.ImageTransferServiceDefinition, m.replicas[0]!.grpcAddress, m.mesh.credentials({ kind: 'user', name: 'admin' }));
    operatorTransfers = createClient(pb.ImageTransferServiceDefinition, m.replicas[0]!.grpcAddress, m.mesh.credentials({ kind: 'user', name: 'operator' }));
    // The second replica (the failover test) starts while the domain is made.
    [second, domain] = await Promise.all([m.startScheduler('scheduler-2'), m.createDomain('gold')]);
    api2 = m.publicApi(second.grpcAddress);
    transfers2 = createClient(pb.ImageTransferServiceDefinition, second.grpcAddress, m.mesh.credentials({ kind: 'user', name: 'admin' }));
    disk = await m.createDisk(domain.id, SIZE, 'disk-up', { format: pb.VolumeFormat.VOLUME_FORMAT_RAW });
  });
  afterAll(async () => {
    transfers2?.close();
    api2?.close();
    transfers?.close();
    operatorTransfers?.close();
    await m.stop();
  });

  /** One HTTPS request to the endpoint as the admin user. */
  function http(url: string, method: string, headers: Record<string, string>, body?: Buffer): Promise<{ status: number; body: Buffer }> {
    return new Promise((resolve, reject) => {
      // The host certificates name sdmesh identities (URI SANs), not DNS names; the CA is what is trusted.
      const req = https.request(url, { method, headers, ...tls, checkServerIdentity: () => undefined }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      });
      req.on('error', reject);
      req.end(body);
    });
  }
  const put = (url: string, offset: number, data: Buffer) =>
    http(url, 'PUT', { 'Content-Range': `bytes ${offset}-${offset + data.length - 1}/*`, 'Content-Length': String(data.length) }, data);

  /** sdmctl as a subprocess, as the admin user. */
  const sdmctl = (...args: string[]): Promise<{ code: number; out: string }> =>
    new Promise((resolve) => {
      const env = { ...process.env, SDMESH_ADDRESS: m.replicas[0]!.grpcAddress, ...m.mesh.tlsEnv({ kind: 'user', name: 'admin' }), SDMCTL_OUTPUT: '' };
      execFile(process.execPath, [SDMCTL, ...args], { env, timeout: 150_000 }, (err, out) => {
        resolve({ code: err ? Number((err as { code?: unknown }).code ?? -1) : 0, out });
      });
    });

  const start = (over: Partial<pb.StartImageTransferRequest>) =>
    transfers.startImageTransfer({ requestId: `t-${++seq}`, storageDomainId: domain.id, diskId: disk.id, direction: UPLOAD, ...over });

  async function ready(op: pb.Operation, client = transfers): Promise<pb.ImageTransfer> {
    for (const until = Date.now() + 120_000; Date.now() < until; await new Promise((r) => setTimeout(r, 300))) {
      const t = await client.getImageTransfer({ name: op.name });
      if (t.phase === pb.TransferPhase.TRANSFER_PHASE_READY) return t;
      if (t.phase === pb.TransferPhase.TRANSFER_PHASE_ENDED) throw new Error(`transfer ended before it was ready: ${JSON.stringify(t.error)}`);
    }
    throw new Error('transfer not ready');
  }

  const leaf = async (api = m.api) => {
    const d = await api.disks.getDisk({ storageDomainId: domain.id, diskId: disk.id });
    return d.volumes[d.volumes.length - 1]!;
  };

  async function checksum(host = m.mesh.hosts[0]!.name, api = m.api): Promise<string> {
    const mover = createClient(pb.DataMoverServiceDefinition, m.hostOf(host).services['data-mover']!.grpcAddress, m.mesh.credentials({ kind: 'scheduler' }));
    try {
      const v = await leaf(api);
      return (await mover.checksumVolume({ volume: { domainPath: domain.path, imageId: disk.id, volumeId: v.id } }, { timeoutMs: 120_000 })).checksum;
    } finally {
      mover.close();
    }
  }
  const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

  it('refuses bad requests with the right codes, before anything is stored', async () => {
    const template = await m.createDisk(domain.id, MiB, 'disk-tpl');
    await m.done(m.api.disks.markDiskTemplate({ requestId: 'tpl', storageDomainId: domain.id, diskId: template.id }));
    const chain = await m.createDisk(domain.id, MiB, 'disk-chain');
    await m.done(m.api.disks.snapshotDisk({ requestId: 'snap', storageDomainId: domain.id, diskId: chain.id }));
    qcow = await m.createDisk(domain.id, MiB, 'disk-qcow', { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    const viewer = createClient(pb.ImageTransferServiceDefinition, m.replicas[0]!.grpcAddress, m.mesh.credentials({ kind: 'user', name: 'viewer' }));
    try {
      const cases: Array<[Promise<unknown>, [string, string]]> = [
        [start({ diskId: template.id }), ['FAILED_PRECONDITION', 'DISK_IS_TEMPLATE']],
        [start({ diskId: chain.id }), ['FAILED_PRECONDITION', 'DISK_HAS_SNAPSHOTS']],
        [start({ diskId: crypto.randomUUID() }), ['NOT_FOUND', 'DISK_NOT_FOUND']],
        [start({ diskId: 'not-a-uuid' }), ['INVALID_ARGUMENT', 'INVALID_DISK_ID']],
        [start({ format: pb.TransferFormat.TRANSFER_FORMAT_QCOW2 }), ['INVALID_ARGUMENT', 'UNSUPPORTED_TRANSFER_FORMAT']],
        [start({ format: 9 as pb.TransferFormat }), ['INVALID_ARGUMENT', 'INVALID_FORMAT']],
        [start({ direction: pb.TransferDirection.TRANSFER_DIRECTION_UNSPECIFIED }), ['INVALID_ARGUMENT', 'INVALID_TRANSFER_DIRECTION']],
        [start({ diskId: qcow.id, direction: DOWNLOAD, bitmap: 'nightly' }), ['NOT_FOUND', 'BITMAP_NOT_FOUND']],
        [start({ uploadSizeBytes: SIZE + 512 }), ['INVALID_ARGUMENT', 'IMAGE_LARGER_THAN_DISK']],
        [start({ inactivityTimeoutSeconds: 7200 }), ['INVALID_ARGUMENT', 'INVALID_TIMEOUT']],
        [viewer.startImageTransfer({ requestId: 'v', storageDomainId: domain.id, diskId: disk.id, direction: UPLOAD }), ['PERMISSION_DENIED', 'MISSING_ROLE']],
        [transfers.finalizeImageTransfer({ name: `operations/${crypto.randomUUID()}` }), ['NOT_FOUND', 'OPERATION_NOT_FOUND']],
      ];
      for (const [p, want] of cases) expect(await codeOf(p)).toEqual(want);
      // A disk published to a host is in use there: no upload (a download may read it).
      const attach = createClient(pb.DiskAttachmentServiceDefinition, m.replicas[0]!.grpcAddress, m.mesh.credentials({ kind: 'user', name: 'admin' }));
      try {
        const where = { storageDomainId: domain.id, diskId: disk.id };
        await attach.publishDisk({ ...where, host: m.mesh.hosts[0]!.name, mode: pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE });
        expect(await codeOf(start({}))).toEqual(['FAILED_PRECONDITION', 'DISK_PUBLISHED']);
        await attach.unpublishDisk({ ...where, host: '' });
      } finally {
        attach.close();
      }
      const { operations } = await m.api.ops.listOperations({ filter: 'type=IMAGE_TRANSFER' });
      expect(operations).toEqual([]);
      expect((await leaf()).legality).toBe(pb.Legality.LEGALITY_LEGAL);
    } finally {
      viewer.close();
    }
  });

  it('uploads: the disk is ILLEGAL and locked until finalize, then LEGAL with the data; a download reads it back', async () => {
    const before = await leaf();
    const op = await start({});
    const t = await ready(op);
    expect(t.url).toMatch(/^https:\/\/.+\/images\/[A-Za-z0-9_-]{43}$/);
    expect(t.sizeBytes).toBe(SIZE);
    // The URL (its ticket) is only for the user who started it.
    expect((await operatorTransfers.getImageTransfer({ name: op.name })).url).toBe('');
    // Another operator may not end it, by either call: PERMISSION_DENIED, and the transfer goes on.
    const operatorApi = m.publicApi(m.replicas[0]!.grpcAddress, 'operator');
    try {
      for (const call of [
        operatorTransfers.finalizeImageTransfer({ name: op.name }),
        operatorTransfers.cancelImageTransfer({ name: op.name }),
        operatorApi.ops.cancelOperation({ name: op.name }),
      ]) {
        expect(await refusalOf(call)).toEqual([
          'PERMISSION_DENIED',
          'NOT_TRANSFER_OWNER',
          expect.stringMatching(/only the user who started .+ \(sdmesh:\/\/user\/admin\) or an admin may (finalize|cancel) it, not sdmesh:\/\/user\/operator/),
        ]);
      }
    } finally {
      operatorApi.close();
    }
    const untouched = await transfers.getImageTransfer({ name: op.name });
    expect([untouched.phase, untouched.status]).toEqual([pb.TransferPhase.TRANSFER_PHASE_READY, pb.OperationStatus.OPERATION_STATUS_RUNNING]);
    expect((await leaf()).legality).toBe(pb.Legality.LEGALITY_ILLEGAL);
    // The disk is in use: another transfer, a delete, an extend are refused.
    expect(await codeOf(start({}))).toEqual(['ABORTED', 'LOCKED']);
    expect(await codeOf(m.api.disks.deleteDisk({ requestId: 'del', storageDomainId: domain.id, diskId: disk.id }))).toEqual(['ABORTED', 'LOCKED']);
    expect(await codeOf(m.api.disks.extendDisk({ requestId: 'ext', storageDomainId: domain.id, diskId: disk.id, capacityBytes: 2 * SIZE }))).toEqual([
      'FAILED_PRECONDITION',
      'DISK_ILLEGAL',
    ]);

    const data = crypto.randomBytes(SIZE);
    expect((await put(t.url, 0, data.subarray(0, SIZE / 2))).status).toBe(200);
    expect((await put(t.url, SIZE / 2, data.subarray(SIZE / 2))).status).toBe(200);
    // Outside the disk: refused by the endpoint.
    expect((await put(t.url, SIZE, Buffer.alloc(512))).status).toBe(416);
    for (const until = Date.now() + 90_000; (await transfers.getImageTransfer({ name: op.name })).bytesTransferred < SIZE && Date.now() < until;) {
      await new Promise((r) => setTimeout(r, 300));
    }
    expect((await transfers.getImageTransfer({ name: op.name })).bytesTransferred).toBe(SIZE);
    expect((await leaf()).legality).toBe(pb.Legality.LEGALITY_ILLEGAL);

    await transfers.finalizeImageTransfer({ name: op.name });
    const done = await m.wait(op.name);
    expect(done.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(done.steps.map((s) => s.name)).toEqual(['mark-illegal', 'open', 'transfer', 'close', 'commit']);
    const after = await leaf();
    expect(after.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(after.generation).toBe(before.generation + 2);
    expect(await checksum()).toBe(sha256(data));
    // The end's event is published after the operation's record says DONE (and its locks are
    // released), over NATS rather than the call that told the test: waited for, not expected at once.
    await waitFor("the transfer's DONE event on NATS", async () =>
      m.operationEvents(op.name).some((e) => e.status === pb.OperationStatus.OPERATION_STATUS_DONE) ? true : undefined,
    );
    expect(m.operationEvents(op.name).map((e) => e.status)).toEqual(
      expect.arrayContaining([pb.OperationStatus.OPERATION_STATUS_RUNNING, pb.OperationStatus.OPERATION_STATUS_DONE]),
    );
    // The finalize request and the steps after it are operation events on NATS; the host counted the endpoint it closed.
    expect(m.operationEvents(op.name).map((e) => e.step)).toEqual(expect.arrayContaining(['finalize', 'close', 'commit']));
    expect(await m.metrics(m.hostOf(t.host).services['data-mover']!)).toMatch(
      /^sdmesh_data_mover_transfers_closed_total\{direction="upload",outcome="finalized"[^}]*\} [1-9]/m,
    );
    // Finalize again: the transfer has ended.
    expect(await codeOf(transfers.finalizeImageTransfer({ name: op.name }))).toEqual(['OK', '']);

    const down = await start({ direction: DOWNLOAD });
    const dt = await ready(down);
    const got = await http(dt.url, 'GET', { Range: `bytes=0-${SIZE - 1}` });
    expect(got.status).toBe(206);
    expect(sha256(got.body)).toBe(sha256(data));
    await transfers.finalizeImageTransfer({ name: down.name });
    expect((await m.wait(down.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect((await leaf()).generation).toBe(after.generation);

    // A qcow2 disk: the guest data goes in through qemu, and the finalize runs qemu-img check on the leaf.
    const q = await start({ diskId: qcow.id });
    const qt = await ready(q);
    const qdata = crypto.randomBytes(MiB);
    expect((await put(qt.url, 0, qdata)).status).toBe(200);
    await transfers.finalizeImageTransfer({ name: q.name });
    const qdone = await m.wait(q.name);
    expect([qdone.status, qdone.error?.message]).toEqual([pb.OperationStatus.OPERATION_STATUS_DONE, undefined]);
    const qdown = await start({ diskId: qcow.id, direction: DOWNLOAD });
    const qgot = await http((await ready(qdown)).url, 'GET', { Range: `bytes=0-${MiB - 1}` });
    expect(sha256(qgot.body)).toBe(sha256(qdata));
    await transfers.cancelImageTransfer({ name: qdown.name });
    expect((await m.wait(qdown.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);

    // An admin may end anyone's transfer: an operator's download, cancelled by the admin.
    const theirs = await operatorTransfers.startImageTransfer({ requestId: `t-${++seq}`, storageDomainId: domain.id, diskId: disk.id, direction: DOWNLOAD });
    expect((await ready(theirs, operatorTransfers)).owner).toBe('sdmesh://user/operator');
    await transfers.cancelImageTransfer({ name: theirs.name });
    expect((await m.wait(theirs.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_ABORTED);
  });

  it('cancel and inactivity roll back: an upload whose URL was out stays ILLEGAL (never LEGAL with partial data) until a new upload', async () => {
    const g0 = (await leaf()).generation;
    // Through sdmctl this time: start (waiting for the URL), show, cancel.
    const started = await sdmctl('transfers', 'start', '-d', domain.id, disk.id, '--direction', 'upload', '--wait-ready', '-o', 'json');
    expect(started.code).toBe(0);
    const t = JSON.parse(started.out) as { name: string; url: string };
    const op = { name: t.name };
    expect((await put(t.url, 0, Buffer.alloc(MiB, 0x5a))).status).toBe(200);
    expect((await sdmctl('transfers', 'show', t.name)).out).toMatch(/Phase:\s+READY/);
    expect((await sdmctl('transfers', 'cancel', t.name, '--wait')).code).toBe(0);
    const cancelled = await m.wait(op.name);
    expect([cancelled.status, cancelled.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_ABORTED, 'OPERATION_CANCELLED']);
    let v = await leaf();
    expect(v.legality).toBe(pb.Legality.LEGALITY_ILLEGAL);
    expect(v.generation).toBeGreaterThanOrEqual(g0 + 2); // marked ILLEGAL, then fenced
    // The endpoint is closed: the ticket no longer works.
    expect((await put(t.url, 0, Buffer.alloc(512))).status).toBeGreaterThanOrEqual(400);
    // A download of the partial disk is refused.
    expect(await codeOf(start({ direction: DOWNLOAD }))).toEqual(['FAILED_PRECONDITION', 'DISK_ILLEGAL']);

    // Nobody sends anything: the inactivity timeout fails and rolls it back.
    const idle = await start({ inactivityTimeoutSeconds: 2 });
    await ready(idle);
    const timedOut = await m.wait(idle.name);
    expect([timedOut.status, timedOut.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_FAILED, 'TRANSFER_IDLE']);
    expect((await leaf()).legality).toBe(pb.Legality.LEGALITY_ILLEGAL);

    // A new, complete upload is how the disk comes back.
    const redo = await start({});
    const rt = await ready(redo);
    const data = crypto.randomBytes(SIZE);
    expect((await put(rt.url, 0, data)).status).toBe(200);
    await transfers.finalizeImageTransfer({ name: redo.name });
    expect((await m.wait(redo.name)).status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    v = await leaf();
    expect(v.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(await checksum()).toBe(sha256(data));

    // An idle download changes nothing on the disk.
    const down = await start({ direction: DOWNLOAD, inactivityTimeoutSeconds: 2 });
    await ready(down);
    expect((await m.wait(down.name)).error?.reason).toBe('TRANSFER_IDLE');
    expect(await leaf()).toMatchObject({ legality: pb.Legality.LEGALITY_LEGAL, generation: v.generation });
  });

  it("the serving host's data-mover killed mid-upload: FAILED, rolled back, the disk ILLEGAL and never LEGAL meanwhile", async () => {
    const g0 = (await leaf()).generation;
    const op = await start({});
    const t = await ready(op);
    expect((await put(t.url, 0, crypto.randomBytes(2 * MiB))).status).toBe(200);
    const mover = m.hostOf(t.host).services['data-mover']!;
    process.kill(mover.process.pid, 'SIGKILL');
    const seen = new Set<pb.Legality>();
    let end: pb.Operation | undefined;
    while (!end) {
      seen.add((await leaf()).legality);
      const cur = await m.api.ops.getOperation({ name: op.name });
      if ([pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_DONE].includes(cur.status)) end = cur;
      else await new Promise((r) => setTimeout(r, 200));
    }
    expect([end.status, end.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_FAILED, 'TRANSFER_HOST_LOST']);
    expect(end.steps.map((s) => s.name)).toEqual(expect.arrayContaining(['rollback:close', 'rollback:fence']));
    expect(seen).toEqual(new Set([pb.Legality.LEGALITY_ILLEGAL]));
    const v = await leaf();
    expect(v.legality).toBe(pb.Legality.LEGALITY_ILLEGAL);
    expect(v.generation).toBe(g0 + 2); // marked ILLEGAL, then fenced: a late writer's generation is stale
  });

  it('a scheduler replica killed while a transfer is open: another resumes it, and the finalize sent to it ends it', async () => {
    // The disk is ILLEGAL from the previous test: a new upload is how it comes back.
    const op = await start({});
    const t = await ready(op);
    process.kill(m.replicas[0]!.process.pid, 'SIGKILL');
    const data = crypto.randomBytes(SIZE);
    // The endpoint does not need the scheduler while it serves.
    expect((await put(t.url, 0, data)).status).toBe(200);
    await transfers2.finalizeImageTransfer({ name: op.name });
    const done = await m.wait(op.name, api2);
    expect(done.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(done.steps.find((s) => s.name === 'transfer')!.attempt).toBeGreaterThanOrEqual(2); // resumed by the other replica
    expect((await leaf(api2)).legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(await checksum(t.host, api2)).toBe(sha256(data));
  });

  it('the whole serving host killed mid-upload (power loss): FAILED, fenced once sanlock calls it dead, the disk never LEGAL meanwhile', async () => {
    await m.restartDeadDataMovers(2, api2);
    const g0 = (await leaf(api2)).generation;
    const op = await transfers2.startImageTransfer({ requestId: `t-${++seq}`, storageDomainId: domain.id, diskId: disk.id, direction: UPLOAD });
    const t = await ready(op, transfers2);
    expect((await put(t.url, 0, crypto.randomBytes(2 * MiB))).status).toBe(200);
    await m.killHost(t.host);
    const seen = new Set<pb.Legality>();
    let end: pb.Operation | undefined;
    while (!end) {
      seen.add((await leaf(api2)).legality);
      const cur = await api2.ops.getOperation({ name: op.name });
      if ([pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_DONE].includes(cur.status)) end = cur;
      else await new Promise((r) => setTimeout(r, 500));
    }
    expect([end.status, end.error?.reason]).toEqual([pb.OperationStatus.OPERATION_STATUS_FAILED, 'TRANSFER_HOST_LOST']);
    expect(end.steps.find((s) => s.name === 'rollback:fence')?.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(seen).toEqual(new Set([pb.Legality.LEGALITY_ILLEGAL]));
    expect(await leaf(api2)).toMatchObject({ legality: pb.Legality.LEGALITY_ILLEGAL, generation: g0 + 2 });
  });
});
