import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import type http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { createClient, localLeaseManagerClient, pb } from '@sdmesh/common';
import { runCli } from '@sdmesh/sdmctl';
import { EndpointError, TransferEndpoint } from '../../packages/sdmctl/src/transfer/endpoint';
import { upload } from '../../packages/sdmctl/src/transfer/transfers';
import { descriptorFlags, O_DIRECT, processesMentioning } from '../harness/data-mover-mesh';
import { MiB, SchedulerMesh, writeRandom } from '../harness/scheduler-mesh';

const GiB = 1024 * MiB;

/**
 * Image transfer's data plane end to end on a real mesh (sanlock, lease-manager, metadata-tx,
 * data-mover, scheduler as processes; mTLS): sdmctl disks upload/download/backup through the public
 * API and the data-mover's HTTPS endpoint, which reads and writes the volumes through qemu-nbd.
 * Guest data compared with qemu-img compare; bytes on the wire counted by the data-mover's metrics.
 */
describe('image transfer: upload, download, resume, incremental backup', () => {
  const m = new SchedulerMesh(1);
  let dom: pb.StorageDomain;
  let files: string;
  let transfers: ReturnType<typeof createClient<typeof pb.ImageTransferServiceDefinition>>;
  let tlsEnv: NodeJS.ProcessEnv;
  const schedulerAddress = () => m.replicas.map((r) => r.grpcAddress).join(',');

  beforeAll(async () => {
    await m.start();
    dom = await m.createDomain('dom-transfer');
    files = path.join(m.dir, 'files');
    fs.mkdirSync(files);
    tlsEnv = m.mesh.tlsEnv({ kind: 'user', name: 'admin' });
    transfers = createClient(pb.ImageTransferServiceDefinition, schedulerAddress(), m.mesh.credentials({ kind: 'user', name: 'admin' }));
  }, 180_000);
  afterAll(async () => {
    transfers?.close();
    await m.stop();
  }, 60_000);

  const sdmctl = async (...argv: string[]): Promise<{ code: number; out: string; err: string }> => {
    let out = '';
    let err = '';
    const code = await runCli(
      argv,
      { ...tlsEnv, SDMESH_ADDRESS: schedulerAddress() },
      {
        out: { write: (t: string) => void (out += t) },
        err: { write: (t: string) => void (err += t) },
        tty: false,
        signal: new AbortController().signal,
      },
    );
    return { code, out, err };
  };
  const ok = async (...argv: string[]) => {
    const r = await sdmctl(...argv);
    if (r.code !== 0) throw new Error(`sdmctl ${argv.join(' ')} → ${r.code}: ${r.err}${r.out}`);
    return r;
  };
  /** Guest bytes the data-mover moved on the wire so far: read (GET) and written (PUT). */
  const wire = async () => {
    const text = await m.metrics(m.mesh.hosts[0]!.services['data-mover']!);
    const value = (direction: string) =>
      Number(new RegExp(`^sdmesh_data_mover_transfer_bytes_total\\{[^}]*direction="${direction}"[^}]*\\} (\\d+)`, 'm').exec(text)?.[1] ?? NaN);
    return { read: value('read'), written: value('written') };
  };
  const virtualSize = (file: string) =>
    (JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', file], { encoding: 'utf8' })) as { 'virtual-size': number })['virtual-size'];
  const sameGuestData = (a: string, aFormat: string, b: string, bFormat: string) => {
    // qemu-img compare: exit 0 when the guest-visible contents are equal (where one image is shorter, the rest must read as zeros).
    execFileSync('qemu-img', ['compare', '-U', '-f', aFormat, '-F', bFormat, a, b], { stdio: 'pipe' });
    expect(virtualSize(b)).toBe(virtualSize(a));
  };
  const disk = (capacity: number, format: 'RAW' | 'QCOW2', name: string) =>
    m.createDisk(dom.id, capacity, `create-${name}`, { format: format === 'RAW' ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
  const startTransfer = async (diskId: string, direction: 'upload' | 'download', bitmap = '') => {
    const op = await transfers.startImageTransfer({
      requestId: crypto.randomUUID(),
      storageDomainId: dom.id,
      diskId,
      direction: direction === 'upload' ? pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD : pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD,
      format: pb.TransferFormat.TRANSFER_FORMAT_RAW,
      bitmap,
    });
    for (;;) {
      const t = await transfers.getImageTransfer({ name: op.name });
      if (t.phase === pb.TransferPhase.TRANSFER_PHASE_READY) return t;
      if (t.phase === pb.TransferPhase.TRANSFER_PHASE_ENDED) throw new Error(`transfer ended: ${t.error?.message}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  const finalize = async (t: pb.ImageTransfer) => m.done(transfers.finalizeImageTransfer({ name: t.name }));
  const tlsFiles = () => ({ ca: tlsEnv.SDMESH_TLS_CA!, cert: tlsEnv.SDMESH_TLS_CERT!, key: tlsEnv.SDMESH_TLS_KEY! });

  test('a 2 GiB sparse raw and a qcow2 with 512 MiB of data: uploaded and downloaded with sdmctl, guest data equal, zeros never on the wire', async () => {
    const raw = path.join(files, 'sparse.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 2 * GiB);
    for (const [at, count] of [
      [100, 16],
      [1000, 16],
      [2040, 8],
    ] as const)
      writeRandom(raw, at, count);
    const rawData = 40 * MiB;
    const tmp = path.join(files, 'tmp.raw');
    fs.writeFileSync(tmp, '');
    fs.truncateSync(tmp, GiB);
    writeRandom(tmp, 10, 256);
    writeRandom(tmp, 600, 256);
    const qcow2 = path.join(files, 'data.qcow2');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', tmp, qcow2]);
    fs.rmSync(tmp);
    const qcowData = 512 * MiB;

    const rawDisk = await disk(2 * GiB, 'RAW', 'raw');
    const qcowDisk = await disk(GiB, 'QCOW2', 'qcow2');

    let before = await wire();
    await ok('disks', 'upload', '-d', dom.id, rawDisk.id, raw);
    let after = await wire();
    expect(after.written - before.written).toBe(rawData);

    before = after;
    await ok('disks', 'upload', '-d', dom.id, qcowDisk.id, qcow2);
    after = await wire();
    expect(after.written - before.written).toBe(qcowData);

    const rawOut = path.join(files, 'sparse.out.raw');
    before = await wire();
    await ok('disks', 'download', '-d', dom.id, rawDisk.id, rawOut);
    after = await wire();
    expect(after.read - before.read).toBe(rawData);
    sameGuestData(raw, 'raw', rawOut, 'raw');
    // The download is sparse: about the data, not 2 GiB.
    expect(fs.statSync(rawOut).blocks * 512).toBeLessThan(rawData + 16 * MiB);

    const qcowOut = path.join(files, 'data.out.qcow2');
    before = await wire();
    await ok('disks', 'download', '-d', dom.id, qcowDisk.id, qcowOut, '--format', 'qcow2');
    after = await wire();
    expect(after.read - before.read).toBe(qcowData);
    sameGuestData(qcow2, 'qcow2', qcowOut, 'qcow2');
  }, 600_000);

  test('the connection dropped mid-upload: the client resumes from the last acknowledged segment, finalize, content correct', async () => {
    const file = path.join(files, 'resume.raw');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 256 * MiB);
    writeRandom(file, 0, 48);
    const target = await disk(256 * MiB, 'RAW', 'resume');
    const t = await startTransfer(target.id, 'upload');

    // The export: qemu-nbd writes the volume only through O_DIRECT descriptors, and the leaf's lease
    // is held exclusive for the export worker's pid (qemu-nbd's parent, whose sanlock registration it shares).
    const volumeId = target.volumes.at(-1)!.id;
    const volumeFile = path.join(dom.path, 'images', target.id, volumeId);
    const nbd = processesMentioning(volumeId).filter((p) => p.cmdline.startsWith('qemu-nbd'));
    expect(nbd).toHaveLength(1);
    const flags = descriptorFlags(nbd[0]!.pid, volumeFile);
    expect(flags.length).toBeGreaterThan(0);
    expect(flags.every((f) => (f & O_DIRECT) !== 0)).toBe(true);
    const stat = fs.readFileSync(`/proc/${nbd[0]!.pid}/stat`, 'utf8');
    const workerPid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    const leases = localLeaseManagerClient(`unix:${m.mesh.leaseSocket(m.mesh.hosts[0]!.name)}`);
    const held = async () => (await leases.listHeldLeases({ holderPid: 0 })).leases.filter((l) => l.location?.resource === volumeId);
    try {
      expect((await held()).map((l) => [l.holderPid, pb.LeaseMode[l.mode]])).toEqual([[workerPid, 'LEASE_MODE_EXCLUSIVE']]);
      // A TCP proxy in front of the endpoint that cuts every connection once, after ~20 MiB went through it.
      const url = new URL(t.url);
      let cut = 0;
      let passed = 0;
      const proxy = net.createServer((client) => {
        const server = net.connect(Number(url.port), url.hostname);
        client.on('data', (chunk: Buffer) => {
          passed += chunk.length;
          if (cut === 0 && passed > 20 * MiB) {
            cut++;
            client.destroy();
            server.destroy();
            return;
          }
          server.write(chunk);
        });
        server.pipe(client);
        client.on('error', () => server.destroy());
        server.on('error', () => client.destroy());
        client.on('close', () => server.destroy());
      });
      await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', () => r()));
      const via = `https://127.0.0.1:${(proxy.address() as net.AddressInfo).port}${url.pathname}`;
      const endpoint = new TransferEndpoint(via, { host: t.host, tls: tlsFiles() });
      try {
        const result = await upload(endpoint, file, 'raw', { segment: 4 * MiB });
        expect(cut).toBe(1);
        expect(result.retried).toBeGreaterThanOrEqual(1);
        expect(result.dataBytes).toBe(48 * MiB);
      } finally {
        endpoint.close();
        proxy.close();
      }
      await finalize(t);
      // Finalized: the export is gone and its lease released.
      expect(await held()).toEqual([]);
      expect(processesMentioning(volumeId).filter((p) => p.cmdline.startsWith('qemu-nbd'))).toEqual([]);
    } finally {
      leases.close();
    }
    const out = path.join(files, 'resume.out.raw');
    await ok('disks', 'download', '-d', dom.id, target.id, out);
    sameGuestData(file, 'raw', out, 'raw');
  }, 300_000);

  test('incremental backup: full, 3 regions written, incremental reads only their extents; full + incremental restores the disk', async () => {
    const granularity = 64 * 1024;
    const target = await disk(256 * MiB, 'QCOW2', 'backup');
    const initial = path.join(files, 'initial.raw');
    fs.writeFileSync(initial, '');
    fs.truncateSync(initial, 256 * MiB);
    writeRandom(initial, 8, 24);
    writeRandom(initial, 120, 8);
    await ok('disks', 'upload', '-d', dom.id, target.id, initial);
    await m.done(
      m.api.disks.addDiskBitmap({ requestId: crypto.randomUUID(), storageDomainId: dom.id, diskId: target.id, bitmap: 'b1', granularityBytes: granularity }),
    );

    const full = path.join(files, 'full.qcow2');
    await ok('disks', 'backup', '-d', dom.id, target.id, full);

    // Three regions written through an upload transfer (the export's qemu marks the bitmap).
    const regions = [
      { at: 10 * MiB + 4096, size: 100 * 1024 },
      { at: 50 * MiB, size: MiB },
      { at: 200 * MiB + 512, size: 4096 },
    ];
    const t = await startTransfer(target.id, 'upload');
    const endpoint = new TransferEndpoint(t.url, { host: t.host, tls: tlsFiles() });
    try {
      for (const r of regions) await endpoint.write(r.at, crypto.randomBytes(r.size));
      await endpoint.flush();
    } finally {
      endpoint.close();
    }
    await finalize(t);

    const inc = path.join(files, 'inc1.qcow2');
    const before = await wire();
    const res = await ok('-o', 'json', 'disks', 'backup', '-d', dom.id, target.id, inc, '--incremental', '--bitmap', 'b1', '--backing', full);
    const after = await wire();
    const report = JSON.parse(res.out) as { dataBytes: number; dirtyBytes: number };
    // Dirty = each region rounded out to the bitmap's granularity.
    const dirty = regions.reduce((s, r) => s + Math.ceil((r.at + r.size) / granularity) * granularity - Math.floor(r.at / granularity) * granularity, 0);
    expect(report.dirtyBytes).toBe(dirty);
    expect(after.read - before.read).toBe(report.dataBytes);
    expect(report.dataBytes).toBeLessThanOrEqual(dirty);
    expect(report.dataBytes).toBeGreaterThanOrEqual(regions.reduce((s, r) => s + r.size, 0));

    // Restore = the chain full ← inc1: its guest data is the disk's now.
    const now = path.join(files, 'now.raw');
    await ok('disks', 'download', '-d', dom.id, target.id, now);
    sameGuestData(inc, 'qcow2', now, 'raw');
    expect(() => sameGuestData(full, 'qcow2', now, 'raw')).toThrow();
  }, 300_000);

  test('the export dies mid-upload (qemu-nbd SIGKILLed): requests get 409, the transfer fails and is rolled back, the disk is not LEGAL', async () => {
    const target = await disk(16 * MiB, 'RAW', 'export-dies');
    const t = await startTransfer(target.id, 'upload');
    const endpoint = new TransferEndpoint(t.url, { host: t.host, tls: tlsFiles() });
    try {
      await endpoint.write(0, crypto.randomBytes(MiB));
      const volumeId = target.volumes.at(-1)!.id;
      const [nbd] = processesMentioning(volumeId).filter((p) => p.cmdline.startsWith('qemu-nbd'));
      process.kill(nbd!.pid, 'SIGKILL');
      const status = async () =>
        endpoint.write(MiB, crypto.randomBytes(4096)).then(
          () => 200,
          (e: unknown) => (e instanceof EndpointError ? e.status : String(e)),
        );
      // Until the worker noticed, a request fails on the dead export (500); from then on 409.
      for (let i = 0; i < 100 && (await status()) !== 409; i++) await new Promise((r) => setTimeout(r, 100));
      expect(await status()).toBe(409);
    } finally {
      endpoint.close();
    }
    const op = await m.wait(t.name);
    expect([pb.OperationStatus[op.status], op.error?.reason]).toEqual(['OPERATION_STATUS_FAILED', 'TRANSFER_FAILED']);
    const after = await m.api.disks.getDisk({ storageDomainId: dom.id, diskId: target.id });
    expect(pb.Legality[after.volumes.at(-1)!.legality]).toBe('LEGALITY_ILLEGAL');
    // Nothing of the export is left: no qemu-nbd, the lease free.
    const volumeId = target.volumes.at(-1)!.id;
    expect(processesMentioning(volumeId).filter((p) => p.cmdline.startsWith('qemu-nbd'))).toEqual([]);
    const leases = localLeaseManagerClient(`unix:${m.mesh.leaseSocket(m.mesh.hosts[0]!.name)}`);
    try {
      expect((await leases.listHeldLeases({ holderPid: 0 })).leases.filter((l) => l.location?.resource === volumeId)).toEqual([]);
    } finally {
      leases.close();
    }
  }, 180_000);

  test('a client that stalls mid-download does not hold the finalize: the endpoint cuts it, the transfer ends DONE', async () => {
    const target = await disk(64 * MiB, 'RAW', 'stalled');
    const t = await startTransfer(target.id, 'download');
    const url = new URL(t.url);
    let received = 0;
    const stalled = await new Promise<http.ClientRequest>((resolve, reject) => {
      const req = https.request(
        {
          host: url.hostname,
          port: Number(url.port),
          path: url.pathname,
          method: 'GET',
          ca: fs.readFileSync(tlsFiles().ca),
          cert: fs.readFileSync(tlsFiles().cert),
          key: fs.readFileSync(tlsFiles().key),
          checkServerIdentity: () => undefined,
        },
        (res) => {
          // One chunk, then never read again: the server's writes back up until it waits on this client.
          res.once('data', (c: Buffer) => {
            received += c.length;
            res.pause();
            resolve(req);
          });
        },
      );
      req.on('error', () => undefined);
      req.end();
      setTimeout(() => reject(new Error('no data')), 60_000);
    });
    try {
      const op = await finalize(t);
      expect(pb.OperationStatus[op.status]).toBe('OPERATION_STATUS_DONE');
      expect(received).toBeLessThan(64 * MiB);
    } finally {
      stalled.destroy();
    }
  }, 180_000);

  test('refused on a real transfer: unknown ticket 404, another user 403, writing to a download 403, outside the disk 416; the disk is unchanged', async () => {
    const target = await disk(32 * MiB, 'RAW', 'refusals');
    const seed = path.join(files, 'seed.raw');
    fs.writeFileSync(seed, '');
    fs.truncateSync(seed, 32 * MiB);
    writeRandom(seed, 1, 2);
    await ok('disks', 'upload', '-d', dom.id, target.id, seed);

    const t = await startTransfer(target.id, 'download');
    const statusOf = async (p: Promise<unknown>) =>
      p.then(
        () => 200,
        (e: unknown) => (e instanceof EndpointError ? e.status : String(e)),
      );
    const admin = new TransferEndpoint(t.url, { host: t.host, tls: tlsFiles() });
    const other = m.mesh.tlsEnv({ kind: 'user', name: 'operator' });
    const operator = new TransferEndpoint(t.url, { host: t.host, tls: { ca: other.SDMESH_TLS_CA!, cert: other.SDMESH_TLS_CERT!, key: other.SDMESH_TLS_KEY! } });
    const unknown = new TransferEndpoint(t.url.replace(/[^/]+$/, crypto.randomBytes(32).toString('base64url')), { host: t.host, tls: tlsFiles() });
    try {
      expect(await statusOf(unknown.read(0, 4096))).toBe(404);
      expect(await statusOf(operator.read(0, 4096))).toBe(403);
      expect(await statusOf(admin.write(0, Buffer.alloc(4096, 7)))).toBe(403);
      expect(await statusOf(admin.zero(0, 4096))).toBe(403);
      expect(await statusOf(admin.read(32 * MiB - 4096, 32 * MiB + 4096))).toBe(416);
      expect((await admin.read(MiB, 3 * MiB)).equals(fs.readFileSync(seed).subarray(MiB, 3 * MiB))).toBe(true);
    } finally {
      for (const e of [admin, operator, unknown]) e.close();
    }
    await finalize(t);
    const out = path.join(files, 'refusals.out.raw');
    await ok('disks', 'download', '-d', dom.id, target.id, out);
    sameGuestData(seed, 'raw', out, 'raw');
  }, 300_000);
});
