import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { connect } from '@nats-io/transport-node';
import { createClient, identityUri, MeshTls, pb, type TlsFiles } from '@sdmesh/common';
import { LocalMesh, LocalPki, type RunningService } from '@sdmesh/localmesh';
import { codeOf, MiB, publicApi, writeRandom, type PublicApi } from '../harness/scheduler-mesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

const RELOAD_MS = 500;
const DONE = pb.OperationStatus.OPERATION_STATUS_DONE;
const ENDED = new Set([DONE, pb.OperationStatus.OPERATION_STATUS_FAILED, pb.OperationStatus.OPERATION_STATUS_ABORTED]);

/** What a fresh TLS connection to a service shows: the serial of the certificate it presents. */
function presentedSerial(address: string, client: TlsFiles): Promise<string> {
  const [host, port] = [address.slice(0, address.lastIndexOf(':')), Number(address.slice(address.lastIndexOf(':') + 1))];
  return new Promise((resolve, reject) => {
    const socket = tls.connect({
      host,
      port,
      ca: fs.readFileSync(client.ca),
      cert: fs.readFileSync(client.cert),
      key: fs.readFileSync(client.key),
      ALPNProtocols: ['h2'],
      servername: 'sdmesh',
      // The CA check stays on (rejectUnauthorized); sdmesh names servers by URI SAN, not host name.
      checkServerIdentity: () => undefined,
    });
    socket.once('secureConnect', () => {
      const serial = socket.getPeerCertificate().serialNumber;
      socket.destroy();
      resolve(serial.toUpperCase());
    });
    socket.once('error', reject);
  });
}

const serialOf = (file: string) => new crypto.X509Certificate(fs.readFileSync(file)).serialNumber.toUpperCase();

/**
 * Rotating every certificate of a running mesh (a new key pair and serial for each, files
 * replaced in place as cert-manager does): services take the new files without a restart,
 * new connections see them, calls in flight across the swap finish. And what must be refused
 * at the door: expired certificates, certificates of another CA, servers of another CA.
 */
describe('mTLS: certificate rotation and refused certificates on a real mesh', () => {
  const dir = makeTestDir('mtls-rotation');
  const mesh = new LocalMesh({
    dir,
    hosts: 1,
    env: {
      SDMESH_IO_TIMEOUT: '1',
      SDMESH_EVENT_HEARTBEAT_MS: '0',
      SDMESH_HOST_POLL_MS: '500',
      SDMESH_TLS_RELOAD_MS: String(RELOAD_MS),
      SDMESH_COPY_RATE_LIMIT: String(8 * MiB),
    },
    logLevel: 'info',
  });
  let api: PublicApi;
  let domain: pb.StorageDomain;
  let disk: pb.Disk;

  async function done(p: Promise<pb.Operation>, client = api): Promise<pb.Operation> {
    const { name } = await p;
    for (;;) {
      const op = await client.ops.waitOperation({ name, timeoutSeconds: 5 }, { timeoutMs: 15_000 });
      if (ENDED.has(op.status)) {
        if (op.status !== DONE) throw new Error(`${name} ended ${pb.operationStatusToJSON(op.status)}: ${op.error?.message}`);
        return op;
      }
    }
  }

  beforeAll(async () => {
    await mesh.start();
    api = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    for (let i = 0; !(await api.hosts.listHosts({})).hosts.some((h) => h.healthy); i++) {
      if (i > 100) throw new Error('host1 never became healthy');
      await new Promise((r) => setTimeout(r, 300));
    }
    const d = await done(api.domains.createStorageDomain({ requestId: 'dom', name: 'rot', path: path.join(mesh.storageDir, 'rot') }));
    domain = d.result?.$case === 'storageDomain' ? d.result.storageDomain : (undefined as never);
    const k = await done(api.disks.createDisk({ requestId: 'disk-1', storageDomainId: domain.id, capacityBytes: 64 * MiB }));
    disk = k.result?.$case === 'disk' ? k.result.disk : (undefined as never);
    writeRandom(disk.volumes[0]!.path, 0, 48);
  }, 120_000);

  afterAll(async () => {
    api?.close();
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  const admin = () => mesh.pki.forIdentity({ kind: 'user', name: 'admin' });
  /** Each service's TCP port and the certificate file it serves from. */
  const servers = (): Array<{ svc: RunningService; cert: string }> =>
    mesh.services().map((svc) => ({
      svc,
      cert: svc.name === 'scheduler' ? path.join(mesh.pki.dir, 'scheduler.pem') : path.join(mesh.pki.dir, `${svc.host}-${svc.name}.pem`),
    }));

  const logOf = (svc: RunningService) => path.join(mesh.logDir, svc.name === 'scheduler' ? 'scheduler.log' : `${svc.host}-${svc.name}.log`);
  /** How many times each service has taken new TLS files so far. */
  const reloads = () => mesh.services().map((svc) => fs.readFileSync(logOf(svc), 'utf8').split('TLS certificates reloaded').length - 1);
  async function waitReloaded(before: number[]): Promise<void> {
    const until = Date.now() + 15_000;
    for (;;) {
      const now = reloads();
      if (now.every((n, i) => n > before[i]!)) return;
      if (Date.now() > until)
        throw new Error(`not every service reloaded its TLS files: ${JSON.stringify(mesh.services().map((s, i) => [s.name, before[i], now[i]]))}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  test('every certificate replaced with a new key pair: new connections see it, an in-flight copy finishes, no restart, the mesh keeps working', async () => {
    const pids = mesh.services().map((s) => s.process.pid);
    const before = new Map<string, string>();
    for (const { svc, cert } of servers()) {
      const serial = await presentedSerial(svc.grpcAddress, admin());
      expect(serial).toBe(serialOf(cert));
      before.set(svc.grpcAddress, serial);
    }
    expect(before.size).toBe(5); // lease-manager, metadata-tx, data-mover, gc, scheduler

    // A copy throttled to 8 MiB/s (48 MiB of data: several seconds), watched over a channel
    // opened before the rotation; the scheduler drives it over its own channels meanwhile.
    const copy = await api.disks.copyDisk({ requestId: 'copy-1', storageDomainId: domain.id, diskId: disk.id, targetStorageDomainId: domain.id });
    const seen: pb.Operation[] = [];
    let rotatedAt = 0;
    const watching = (async () => {
      for await (const op of api.ops.watchOperation({ name: copy.name }, { timeoutMs: 120_000 })) seen.push(op);
    })();
    const copying = () => seen.some((o) => o.currentStep.startsWith('copy-volume') && o.status === pb.OperationStatus.OPERATION_STATUS_RUNNING);
    // Until its copy step runs (placing it and creating the target take a while on a busy machine).
    for (const until = Date.now() + 90_000; !copying();) {
      if (Date.now() > until || seen.some((o) => ENDED.has(o.status)))
        throw new Error(`the copy was not seen running: ${JSON.stringify(seen.map((o) => [o.currentStep, o.status]))}`);
      await new Promise((r) => setTimeout(r, 50));
    }

    const rotatedNames = mesh.pki.reissue();
    expect(rotatedNames.map((c) => c.name)).toEqual(
      expect.arrayContaining(['scheduler', 'host1-lease-manager', 'host1-metadata-tx', 'host1-data-mover', 'host1-gc', 'user-admin', 'nats-server']),
    );
    // New connections get the new certificates from every service within a few reload periods.
    for (const { svc, cert } of servers()) {
      const want = serialOf(cert);
      expect(want).not.toBe(before.get(svc.grpcAddress));
      let got = '';
      for (let i = 0; i < 40 && got !== want; i++) {
        got = await presentedSerial(svc.grpcAddress, admin());
        if (got !== want) await new Promise((r) => setTimeout(r, RELOAD_MS / 2));
      }
      expect(`${svc.host}/${svc.name}: ${got}`).toBe(`${svc.host}/${svc.name}: ${want}`);
    }
    rotatedAt = seen.length;
    // The swap happened while the copy ran: it was not over when every server had rotated.
    expect(seen.some((o) => ENDED.has(o.status))).toBe(false);

    await watching;
    const final = seen[seen.length - 1]!;
    expect(final.status).toBe(DONE);
    expect(final.steps.every((s) => s.status === DONE)).toBe(true);
    expect(seen.length).toBeGreaterThan(rotatedAt); // the stream kept delivering after the swap
    const target = final.result?.$case === 'disk' ? final.result.disk : undefined;
    expect(target?.volumes).toHaveLength(1);

    // Each service said it took the new files (server and client side share one provider).
    expect(mesh.services().map((s, i) => `${s.name}: ${reloads()[i]! > 0}`)).toEqual(mesh.services().map((s) => `${s.name}: true`));
    // No process restarted.
    expect(mesh.services().map((s) => s.process.pid)).toEqual(pids);
    expect(mesh.services().every((s) => s.process.running())).toBe(true);

    // A fresh client with the new admin certificate: the mesh keeps working end to end.
    const fresh = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    try {
      const got = await fresh.disks.getDisk({ storageDomainId: domain.id, diskId: target!.id });
      expect(got.volumes.map((v) => v.id)).toEqual(target!.volumes.map((v) => v.id));
      const created = await done(fresh.disks.createDisk({ requestId: 'disk-after-rotation', storageDomainId: domain.id, capacityBytes: 16 * MiB }), fresh);
      expect(created.result?.$case).toBe('disk');
      const { disks } = await fresh.disks.listDisks({ storageDomainId: domain.id });
      expect(disks.map((d) => d.id)).toEqual(expect.arrayContaining([disk.id, target!.id, created.result?.$case === 'disk' ? created.result.disk.id : '']));
    } finally {
      fresh.close();
    }
    // The channel opened before the rotation still works (its connection outlived the swap).
    await expect(api.hosts.listHosts({})).resolves.toBeDefined();
  }, 150_000);

  test('expired certificates and certificates of another CA are refused; nothing changes', async () => {
    const adminUri = identityUri({ kind: 'user', name: 'admin' });
    const day = 86400_000;
    const expired = mesh.pki.issue('expired-admin', [`URI:${adminUri}`], { notBefore: new Date(Date.now() - 2 * day), notAfter: new Date(Date.now() - day) });
    const expiredScheduler = mesh.pki.issue('expired-scheduler', [`URI:${identityUri({ kind: 'scheduler' })}`], {
      notBefore: new Date(Date.now() - 2 * day),
      notAfter: new Date(Date.now() - day),
    });
    const other = new LocalPki(path.join(dir, 'other-pki'), 'another CA');
    const foreign = other.forIdentity({ kind: 'user', name: 'admin' });
    const schedulerAddress = mesh.scheduler!.grpcAddress;
    const metadataTx = mesh.hosts[0]!.services['metadata-tx']!.grpcAddress;
    const { disks: disksBefore } = await api.disks.listDisks({ storageDomainId: domain.id });
    const diskIds = disksBefore.map((d) => d.id).sort();

    // Expired client certificate, trusted CA: UNAUTHENTICATED, on the public API and on a host service.
    const expiredApi = publicApi(schedulerAddress, MeshTls.fromFiles(expired).channelCredentials());
    const expiredSched = createClient(pb.MetadataTxServiceDefinition, metadataTx, MeshTls.fromFiles(expiredScheduler).channelCredentials());
    // A certificate of another CA, presented to servers that trust only ours: UNAUTHENTICATED.
    const foreignCert = publicApi(schedulerAddress, MeshTls.fromFiles({ ca: mesh.pki.caFile, cert: foreign.cert, key: foreign.key }).channelCredentials());
    // A client that trusts only the other CA does not accept our servers: the handshake fails.
    const foreignTrust = publicApi(schedulerAddress, MeshTls.fromFiles(foreign).channelCredentials());
    try {
      expect(await codeOf(expiredApi.hosts.listHosts({}))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
      expect(await codeOf(expiredApi.disks.deleteDisk({ requestId: 'del-expired', storageDomainId: domain.id, diskId: disk.id }))).toEqual([
        'UNAUTHENTICATED',
        'NO_CLIENT_CERTIFICATE',
      ]);
      expect(await codeOf(expiredSched.deleteImage({ domainPath: domain.path, imageId: disk.id }))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
      expect(await codeOf(foreignCert.hosts.listHosts({}))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
      expect(await codeOf(foreignCert.disks.deleteDisk({ requestId: 'del-foreign', storageDomainId: domain.id, diskId: disk.id }))).toEqual([
        'UNAUTHENTICATED',
        'NO_CLIENT_CERTIFICATE',
      ]);
      const [code] = await codeOf(foreignTrust.hosts.listHosts({}, { timeoutMs: 5000 }));
      expect(code).toBe('UNAVAILABLE');
      // The same at the TLS layer: our server's certificate does not verify against the other CA.
      await expect(presentedSerial(schedulerAddress, foreign)).rejects.toThrow(/certificate/i);
    } finally {
      for (const c of [expiredApi, foreignCert, foreignTrust]) c.close();
      expiredSched.close();
    }

    // Nothing changed: the disks are all there, the volume files too, no operation was started.
    const { disks: disksAfter } = await api.disks.listDisks({ storageDomainId: domain.id });
    expect(disksAfter.map((d) => d.id).sort()).toEqual(diskIds);
    expect(fs.existsSync(disk.volumes[0]!.path)).toBe(true);
    const { operations } = await api.ops.listOperations({});
    expect(operations.map((o) => o.requestId)).not.toEqual(expect.arrayContaining(['del-expired']));
    expect(operations.map((o) => o.requestId)).not.toEqual(expect.arrayContaining(['del-foreign']));
    // Each refusal was counted by the service that refused it.
    const metrics = await (await fetch(`http://127.0.0.1:${mesh.scheduler!.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/auth_denied_total\{[^}]*reason="NO_CLIENT_CERTIFICATE"[^}]*\} [1-9]/);
  }, 60_000);

  test('CA rotation: a new CA trusted next to the old one, every certificate reissued by it, the old CA retired; no restart, old-CA certificates refused at the end', async () => {
    const pids = mesh.services().map((s) => s.process.pid);
    const leaves = mesh.pki.issuedNames().filter((n) => !n.startsWith('expired-'));
    // The old CA's admin and scheduler credentials, kept aside to try them at the end.
    const keep = path.join(dir, 'old-ca');
    fs.mkdirSync(keep, { mode: 0o700 });
    const kept = (name: string): TlsFiles => {
      for (const ext of ['pem', 'key']) fs.copyFileSync(path.join(mesh.pki.dir, `${name}.${ext}`), path.join(keep, `${name}.${ext}`));
      fs.copyFileSync(mesh.pki.caFile, path.join(keep, 'ca.pem'));
      return { ca: path.join(keep, 'ca.pem'), cert: path.join(keep, `${name}.pem`), key: path.join(keep, `${name}.key`) };
    };
    const oldAdmin = kept('user-admin');
    const oldScheduler = kept('scheduler');
    const metadataTx = mesh.hosts[0]!.services['metadata-tx']!.grpcAddress;
    const nextCa = path.join(mesh.pki.dir, 'ca-next.pem');

    // Step 1: trust the new CA next to the old one.
    let before = reloads();
    mesh.pki.beginCaRotation();
    expect(fs.readFileSync(mesh.pki.caFile, 'utf8').match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
    await waitReloaded(before);

    // Step 2: every certificate reissued by the new CA (nats-server told to re-read its own).
    before = reloads();
    mesh.pki.reissue(leaves);
    mesh.nats.reloadTls();
    await waitReloaded(before);
    for (const { svc, cert } of servers()) {
      // Verified against the new CA alone, and the serial of the file just written.
      expect(`${svc.name}: ${await presentedSerial(svc.grpcAddress, { ...admin(), ca: nextCa })}`).toBe(`${svc.name}: ${serialOf(cert)}`);
    }
    await expect(presentedSerial(mesh.scheduler!.grpcAddress, oldAdmin)).rejects.toThrow(/certificate/i);
    // Mid-rotation both generations are accepted: the old admin certificate on a fresh channel, and the new one.
    const oldApi = publicApi(mesh.scheduler!.grpcAddress, MeshTls.fromFiles({ ...oldAdmin, ca: mesh.pki.caFile }).channelCredentials());
    const fresh = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    try {
      await expect(oldApi.hosts.listHosts({})).resolves.toBeDefined();
      const mid = await done(fresh.disks.createDisk({ requestId: 'disk-mid-ca-rotation', storageDomainId: domain.id, capacityBytes: 16 * MiB }), fresh);
      expect(mid.result?.$case).toBe('disk');
    } finally {
      oldApi.close();
      fresh.close();
    }

    // Step 3: the old CA is retired.
    before = reloads();
    mesh.pki.finishCaRotation();
    mesh.nats.reloadTls();
    await waitReloaded(before);
    expect(fs.readFileSync(mesh.pki.caFile, 'utf8').match(/BEGIN CERTIFICATE/g)).toHaveLength(1);
    const oldAfter = publicApi(mesh.scheduler!.grpcAddress, MeshTls.fromFiles({ ...oldAdmin, ca: mesh.pki.caFile }).channelCredentials());
    const oldSched = createClient(pb.MetadataTxServiceDefinition, metadataTx, MeshTls.fromFiles({ ...oldScheduler, ca: mesh.pki.caFile }).channelCredentials());
    const after = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    try {
      expect(await codeOf(oldAfter.hosts.listHosts({}))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
      expect(await codeOf(oldSched.listImages({ domainPath: domain.path }))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
      const end = await done(after.disks.createDisk({ requestId: 'disk-after-ca-rotation', storageDomainId: domain.id, capacityBytes: 16 * MiB }), after);
      expect(end.result?.$case).toBe('disk');
    } finally {
      oldAfter.close();
      oldSched.close();
      after.close();
    }
    // A new NATS connection verifies nats-server against the new CA alone.
    let nc: Awaited<ReturnType<typeof connect>> | undefined;
    for (let i = 0; !nc; i++) {
      nc = await connect(mesh.nats.connectOptions('sdmctl')).catch((err: unknown) => {
        if (i >= 20) throw err;
        return undefined;
      });
      if (!nc) await new Promise((r) => setTimeout(r, 250));
    }
    await nc.flush();
    await nc.close();
    expect(mesh.services().map((s) => s.process.pid)).toEqual(pids);
  }, 120_000);
});
