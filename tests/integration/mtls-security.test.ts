import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { checkHealth, createClient, localLeaseManagerClient, MeshTls, pb, sameIdentity, serverIdentityCheck, type ServiceDefinition } from '@sdmesh/common';
import { LocalPki, waitFor } from '@sdmesh/localmesh';
import { TestLeaseHolder } from '../harness/lease-holder';
import { codeOf, MiB, SchedulerMesh } from '../harness/scheduler-mesh';

const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** Hashes of every file under dir (what "nothing on storage changed" is checked against). */
function treeHashes(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      // The sanlock areas change on their own (delta lease renewals, the GC's lease): sanlock's
      // own state is checked through its owners instead.
      else if (e.isFile() && !(path.basename(d) === 'dom_md' && (e.name === 'ids' || e.name === 'leases'))) out[path.relative(dir, p)] = sha256(p);
    }
  };
  walk(dir);
  return out;
}

/**
 * The trust boundary of issue 12 against a real mesh (2 sanlock hosts, nats-server with
 * credentials, every service its own process, real mTLS): who may call what, and that a
 * refused call changes nothing on storage, in KV or in sanlock.
 */
describe('mTLS and authorization across the mesh', () => {
  const m = new SchedulerMesh(2);
  let domain: pb.StorageDomain;
  let disk: pb.Disk;
  const holders: TestLeaseHolder[] = [];

  beforeAll(async () => {
    await m.start();
    domain = await m.createDomain('sec');
    disk = await m.createDisk(domain.id, 16 * MiB, 'sec-disk-1');
  }, 180_000);
  afterAll(async () => {
    await Promise.all(holders.map((h) => h.kill()));
    await m.stop();
  }, 60_000);

  const host = (i: number) => m.mesh.hosts[i]!;
  const addressOf = (i: number, svc: 'lease-manager' | 'metadata-tx' | 'data-mover' | 'gc') => host(i).services[svc]!.grpcAddress;
  const schedulerAddress = () => m.replicas[0]!.grpcAddress;
  const as = <D extends ServiceDefinition>(def: D, address: string, credentials: grpc.ChannelCredentials) => createClient(def, address, credentials);
  const ca = () => fs.readFileSync(m.mesh.pki.caFile);

  test('no client certificate: every service answers UNAUTHENTICATED, health included', async () => {
    // Trusts the mesh CA, presents nothing.
    const anonymous = grpc.credentials.createSsl(ca(), null, null, { checkServerIdentity: serverIdentityCheck() });
    const targets: Array<[string, ServiceDefinition, string, string, object]> = [
      ['scheduler', pb.HostServiceDefinition, schedulerAddress(), 'listHosts', {}],
      ['lease-manager', pb.LeaseManagerServiceDefinition, addressOf(0, 'lease-manager'), 'listLockspaces', {}],
      ['metadata-tx', pb.MetadataTxServiceDefinition, addressOf(0, 'metadata-tx'), 'listImages', { domainPath: domain.path }],
      ['data-mover', pb.DataMoverServiceDefinition, addressOf(0, 'data-mover'), 'getHostLoad', {}],
      ['gc', pb.GcServiceDefinition, addressOf(0, 'gc'), 'getGcStatus', {}],
    ];
    for (const [name, def, address, method, request] of targets) {
      const client = as(def, address, anonymous) as unknown as Record<string, (r: object) => Promise<unknown>> & { close(): void };
      expect([name, await codeOf(client[method]!(request))]).toEqual([name, ['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']]);
      client.close();
      expect([name, await checkHealth(address, anonymous).catch((e: { code: number }) => grpc.status[e.code])]).toEqual([name, 'UNAUTHENTICATED']);
    }
    // Plaintext to a TLS port never gets an answer.
    const plain = as(pb.HostServiceDefinition, schedulerAddress(), grpc.credentials.createInsecure());
    expect((await codeOf(plain.listHosts({}, { timeoutMs: 5000 })))[0]).toMatch(/UNAVAILABLE|DEADLINE_EXCEEDED/);
    plain.close();
  });

  test('a certificate from another CA fails the handshake; presented to our servers it is UNAUTHENTICATED; so is an expired one', async () => {
    const foreign = new LocalPki(path.join(m.dir, 'foreign-pki'), 'someone else').forIdentity({ kind: 'user', name: 'admin' });
    // A client of the other CA does not trust our servers: the handshake fails.
    const theirs = as(pb.HostServiceDefinition, schedulerAddress(), MeshTls.fromFiles(foreign).channelCredentials());
    const [code] = await codeOf(theirs.listHosts({}, { timeoutMs: 5000 }));
    expect(code).toBe('UNAVAILABLE');
    theirs.close();
    // Trusting our CA but presenting the foreign certificate: refused before any handler.
    const mixed = grpc.credentials.createSsl(ca(), fs.readFileSync(foreign.key), fs.readFileSync(foreign.cert), { checkServerIdentity: serverIdentityCheck() });
    const mixedClient = as(pb.HostServiceDefinition, schedulerAddress(), mixed);
    expect(await codeOf(mixedClient.listHosts({}))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
    mixedClient.close();
    // Our CA, expired yesterday.
    const expired = m.mesh.pki.issue('user-expired', ['URI:sdmesh://user/admin'], {
      notBefore: new Date(Date.now() - 10 * 86400_000),
      notAfter: new Date(Date.now() - 86400_000),
    });
    const old = as(pb.HostServiceDefinition, schedulerAddress(), MeshTls.fromFiles(expired).channelCredentials());
    expect(await codeOf(old.listHosts({}))).toEqual(['UNAUTHENTICATED', 'NO_CLIENT_CERTIFICATE']);
    old.close();
  });

  test('a viewer may read but not delete; operator and admin rights follow the roles file', async () => {
    const before = treeHashes(domain.path);
    const opsBefore = (await m.api.ops.listOperations({})).operations.length;
    const viewer = m.publicApi(schedulerAddress(), 'viewer');
    expect((await viewer.disks.getDisk({ storageDomainId: domain.id, diskId: disk.id })).id).toBe(disk.id);
    const [code, reason] = await codeOf(viewer.disks.deleteDisk({ requestId: 'viewer-delete', storageDomainId: domain.id, diskId: disk.id }));
    expect([code, reason]).toEqual(['PERMISSION_DENIED', 'MISSING_ROLE']);
    const message = await viewer.disks.deleteDisk({ requestId: 'viewer-delete', storageDomainId: domain.id, diskId: disk.id }).catch((e: Error) => e.message);
    expect(message).toMatch(/needs role operator; user "viewer" has role viewer/);
    // An operator may not create domains (admin).
    const operator = m.publicApi(schedulerAddress(), 'operator');
    expect(await codeOf(operator.domains.createStorageDomain({ requestId: 'op-domain', name: 'nope', path: path.join(m.mesh.storageDir, 'nope') }))).toEqual([
      'PERMISSION_DENIED',
      'MISSING_ROLE',
    ]);
    // A user the roles file does not name has no rights at all.
    const stranger = as(pb.DiskServiceDefinition, schedulerAddress(), m.mesh.credentials({ kind: 'user', name: 'mallory' }));
    expect(await codeOf(stranger.listDisks({ storageDomainId: domain.id }))).toEqual(['PERMISSION_DENIED', 'MISSING_ROLE']);
    // Nothing changed: the disk is there, its files are the same, no operation was created.
    expect((await m.api.disks.getDisk({ storageDomainId: domain.id, diskId: disk.id })).id).toBe(disk.id);
    expect(treeHashes(domain.path)).toEqual(before);
    expect((await m.api.ops.listOperations({})).operations.length).toBe(opsBefore);
    expect(fs.existsSync(path.join(m.mesh.storageDir, 'nope'))).toBe(false);
    // Counted and audited.
    const metrics = await m.metrics(m.replicas[0]!);
    expect(metrics).toMatch(/sdmesh_grpc_auth_denied_total\{service="scheduler",method="DiskService\/DeleteDisk",reason="MISSING_ROLE"[^}]*\} [1-9]/);
    const audit = m.replicas[0]!.lines.map(
      (l) => JSON.parse(l) as { msg?: string; audit?: { who: string; method: string; outcome: string; target: Record<string, string> } },
    ).filter((l) => l.msg === 'audit');
    expect(audit).toContainEqual(
      expect.objectContaining({
        audit: expect.objectContaining({
          who: 'sdmesh://user/viewer',
          method: 'sdmesh.v1.DiskService/DeleteDisk',
          outcome: 'PERMISSION_DENIED',
          target: expect.objectContaining({ diskId: disk.id }),
        }),
      }),
    );
    for (const c of [viewer, operator]) c.close();
    stranger.close();
  });

  test("a host certificate cannot call another host's metadata-tx (or the public API), and changes nothing", async () => {
    const before = treeHashes(domain.path);
    const asHost2 = as(
      pb.MetadataTxServiceDefinition,
      addressOf(0, 'metadata-tx'),
      m.mesh.credentials({ kind: 'host', host: 'host2', service: 'metadata-tx' }),
    );
    expect(await codeOf(asHost2.deleteImage({ domainPath: domain.path, imageId: disk.id, operationId: 'evil' }))).toEqual([
      'PERMISSION_DENIED',
      'WRONG_IDENTITY',
    ]);
    asHost2.close();
    const asHost1Mover = as(pb.DiskServiceDefinition, schedulerAddress(), m.mesh.credentials({ kind: 'host', host: 'host1', service: 'data-mover' }));
    expect(await codeOf(asHost1Mover.deleteDisk({ requestId: 'host-delete', storageDomainId: domain.id, diskId: disk.id }))).toEqual([
      'PERMISSION_DENIED',
      'WRONG_IDENTITY',
    ]);
    asHost1Mover.close();
    // A user (even admin) is not the scheduler: no direct storage steps.
    const adminToMover = as(pb.DataMoverServiceDefinition, addressOf(0, 'data-mover'), m.mesh.credentials());
    expect(await codeOf(adminToMover.copyVolume({ jobId: 'x' }))).toEqual(['PERMISSION_DENIED', 'WRONG_IDENTITY']);
    adminToMover.close();
    expect(treeHashes(domain.path)).toEqual(before);
    expect((await m.api.disks.getDisk({ storageDomainId: domain.id, diskId: disk.id })).volumes).toHaveLength(1);
  });

  test('heartbeats: a host speaks only for itself, and an address that is not its own service gets no calls', async () => {
    const hosts = async () => new Map((await m.api.hosts.listHosts({})).hosts.map((h) => [h.name, h]));
    const host1Before = (await hosts()).get('host1')!;
    const heartbeat = (name: string, overrides: Partial<pb.Host> = {}) =>
      pb.Host.fromPartial({
        name,
        hostIds: { '': name === 'host1' ? 1 : 2 },
        leaseManagerAddress: addressOf(name === 'host1' ? 0 : 1, 'lease-manager'),
        metadataTxAddress: addressOf(name === 'host1' ? 0 : 1, 'metadata-tx'),
        dataMoverAddress: addressOf(name === 'host1' ? 0 : 1, 'data-mover'),
        gcAddress: addressOf(name === 'host1' ? 0 : 1, 'gc'),
        ...overrides,
      });
    const host2Agent = as(pb.HostServiceDefinition, schedulerAddress(), m.mesh.credentials({ kind: 'host', host: 'host2', service: 'lease-manager' }));
    // host2 claiming to be host1, pointing host1's metadata-tx at a proxy: refused.
    expect(await codeOf(host2Agent.heartbeat({ host: heartbeat('host1', { metadataTxAddress: '127.0.0.1:1' }) }))).toEqual(['PERMISSION_DENIED', 'WRONG_HOST']);
    // Only a lease-manager certificate sends heartbeats.
    const host2Gc = as(pb.HostServiceDefinition, schedulerAddress(), m.mesh.credentials({ kind: 'host', host: 'host2', service: 'gc' }));
    expect(await codeOf(host2Gc.heartbeat({ host: heartbeat('host2') }))).toEqual(['PERMISSION_DENIED', 'WRONG_IDENTITY']);
    host2Gc.close();
    const host1After = (await hosts()).get('host1')!;
    expect([host1After.metadataTxAddress, host1After.leaseManagerAddress]).toEqual([host1Before.metadataTxAddress, host1Before.leaseManagerAddress]);

    // host2 announcing host1's metadata-tx as its own: the scheduler's client checks the
    // server identity (sdmesh://host/host2/metadata-tx), so host2 goes unhealthy instead of
    // host1's service receiving host2's steps.
    expect(await codeOf(host2Agent.heartbeat({ host: heartbeat('host2', { metadataTxAddress: addressOf(0, 'metadata-tx') }) }))).toEqual(['OK', '']);
    await waitFor('host2 unhealthy', async () => ((await hosts()).get('host2')?.healthy === false ? true : undefined), 60_000, 250);
    expect(m.replicas[0]!.lines.some((l) => l.includes('not the service this client meant to call'))).toBe(true);
    // Its real addresses again: healthy.
    expect(await codeOf(host2Agent.heartbeat({ host: heartbeat('host2') }))).toEqual(['OK', '']);
    await waitFor('host2 healthy again', async () => ((await hosts()).get('host2')?.healthy ? true : undefined), 60_000, 250);
    host2Agent.close();
  });

  test('the lease API is host-local: a remote caller, a foreign pid or a non-holder is refused and the lease stays', async () => {
    const vol = disk.volumes[0]!;
    const location = vol.lease!;
    const [holderA, holderB] = await Promise.all([0, 0].map(() => TestLeaseHolder.start(host(0).sanlock.env, `unix:${m.mesh.leaseSocket('host1')}`)));
    holders.push(holderA!, holderB!);
    const got = await holderA!.acquire(location, 'exclusive', { operationId: 'sec-hold' });
    expect(got.ok).toBe(true);
    // B (a sibling, not A's parent) naming A: refused both ways.
    const acquireFor = await holderB!.acquireFor(location, holderA!.pid);
    expect(acquireFor.ok ? 'OK' : acquireFor.error.reason).toBe('NOT_HOLDER');
    const releaseFor = await holderB!.releaseFor(location, holderA!.pid);
    expect(releaseFor.ok ? 'OK' : releaseFor.error.reason).toBe('NOT_HOLDER');
    // B releasing as itself: it holds nothing.
    const own = await holderB!.release(location);
    expect(own.ok ? 'OK' : own.error.reason).toBe('LEASE_NOT_HELD');
    // Over TCP, even as the scheduler: no acquire, no release, no format.
    const remote = as(pb.LeaseManagerServiceDefinition, addressOf(0, 'lease-manager'), m.mesh.credentials({ kind: 'scheduler' }));
    expect(await codeOf(remote.releaseLease({ lease: location, holderPid: holderA!.pid }))).toEqual(['PERMISSION_DENIED', 'NOT_LOCAL']);
    expect(await codeOf(remote.acquireLease({ lease: location, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: holderA!.pid }))).toEqual([
      'PERMISSION_DENIED',
      'NOT_LOCAL',
    ]);
    // What the scheduler may see: the lease, not the pid.
    const seen = (await remote.listHeldLeases({})).leases.filter((l) => l.location?.resource === location.resource);
    expect(seen.map((l) => [l.operationId, l.holderPid])).toEqual([['sec-hold', 0]]);
    remote.close();
    // Still A's, says sanlock.
    const held = await holderA!.held();
    expect(held.ok && held.result.map((r) => r.name)).toEqual([location.resource]);
    expect((await holderA!.release(location)).ok).toBe(true);
  });

  test('FormatLockspace/FormatLeases write only a domain dom_md area, never a host file, a link or a live lockspace', async () => {
    const local = localLeaseManagerClient(`unix:${m.mesh.leaseSocket('host1')}`);
    const sentinelDir = path.join(m.dir, 'host-files');
    fs.mkdirSync(sentinelDir, { recursive: true });
    const sentinel = path.join(sentinelDir, 'passwd');
    fs.writeFileSync(sentinel, 'root:x:0:0:root:/root:/bin/bash\n');
    const sum = sha256(sentinel);
    expect(await codeOf(local.formatLockspace({ lockspace: 'evil', path: sentinel, ioTimeoutSeconds: 1 }))).toEqual(['PERMISSION_DENIED', 'NOT_A_DOMAIN_AREA']);
    // A dom_md that is a symbolic link to the host directory.
    const fake = path.join(m.mesh.storageDir, 'fake-domain'); // inside the storage root: the link itself is what is refused
    fs.mkdirSync(fake, { recursive: true });
    fs.symlinkSync(sentinelDir, path.join(fake, 'dom_md'));
    fs.symlinkSync(sentinel, path.join(sentinelDir, 'ids'));
    expect(await codeOf(local.formatLockspace({ lockspace: 'evil', path: path.join(fake, 'dom_md', 'ids'), ioTimeoutSeconds: 1 }))).toEqual([
      'PERMISSION_DENIED',
      'NOT_A_DOMAIN_AREA',
    ]);
    expect(await codeOf(local.formatLeases({ lockspace: 'evil', path: path.join(fake, 'dom_md', 'leases'), leases: [{ resource: 'r', offset: 0 }] }))).toEqual([
      'PERMISSION_DENIED',
      'NOT_A_DOMAIN_AREA',
    ]);
    expect(sha256(sentinel)).toBe(sum);
    // The live domain's lockspace: it is formatted (has metadata), so refused.
    const idsBefore = execFileSync('sha256sum', [path.join(domain.path, 'dom_md', 'metadata')]).toString();
    expect(await codeOf(local.formatLockspace({ lockspace: domain.id, path: path.join(domain.path, 'dom_md', 'ids'), ioTimeoutSeconds: 1 }))).toEqual([
      'FAILED_PRECONDITION',
      'LOCKSPACE_IN_USE',
    ]);
    expect(execFileSync('sha256sum', [path.join(domain.path, 'dom_md', 'metadata')]).toString()).toBe(idsBefore);
    local.close();
    // The mesh still works.
    expect(await checkHealth(addressOf(0, 'lease-manager'), m.mesh.credentials({ kind: 'scheduler' }))).toBe('SERVING');
    const again = await m.createDisk(domain.id, 4 * MiB, 'sec-disk-after');
    expect(again.volumes).toHaveLength(1);
  });

  test('clients check whom they reach: the scheduler identity is required of the public API server', async () => {
    // An admin client pointed at a host's metadata-tx (some other mesh service) refuses the server.
    const strict = MeshTls.fromFiles(m.mesh.pki.forIdentity({ kind: 'user', name: 'admin' })).channelCredentials(sameIdentity({ kind: 'scheduler' }));
    const wrong = as(pb.HostServiceDefinition, addressOf(0, 'metadata-tx'), strict);
    const err = await wrong.listHosts({}, { timeoutMs: 5000 }).catch((e: Error) => e.message);
    expect(err).toMatch(/not the service this client meant to call/);
    wrong.close();
  });
});
