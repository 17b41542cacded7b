import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { createClient, pb } from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';
import { operationDone, sanlockLockspaces, sleep, tookMs, waitFor } from '../harness/lifecycle';
import { codeOf, MiB, publicApi, type PublicApi } from '../harness/scheduler-mesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

const run = promisify(execFile);

/**
 * Disaster recovery: a domain with snapshot chains, a qcow2 disk, a template and a thin clone of
 * it (real files written by qemu-io), the whole mesh stopped, NATS's storage wiped, a fresh mesh
 * (new sanlock daemons, empty KV) started on the same directory, and AttachStorageDomain on the
 * domain's path: the same domain id, disks, chains and guest-visible checksums come back, and
 * every host joins its lockspace. Then a detach (RemoveStorageDomain keep_data) and a re-attach.
 */
describe('AttachStorageDomain: the inventory recovered from storage alone', () => {
  const dir = makeTestDir('adopt');
  const meshOptions = {
    dir,
    hosts: 2,
    heartbeats: { intervalMs: 500 },
    // No periodic GC rounds: a fresh host's GC would join every domain under its storage roots on
    // its own (it has no leave order for one the scheduler never knew); here the attach must do it.
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', SDMESH_HOST_POLL_MS: '500', SDMESH_INTERVAL_MS: '0' },
  };
  let mesh = new LocalMesh(meshOptions);
  let api: PublicApi;

  const done = (p: Promise<pb.Operation>) => operationDone(api, p);
  const diskOf = (op: pb.Operation) => (op.result?.$case === 'disk' ? op.result.disk : pb.Disk.fromPartial({}));
  const startMesh = async () => {
    await mesh.start();
    api = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    await waitFor('two healthy hosts', async () => ((await api.hosts.listHosts({})).hosts.filter((h) => h.healthy).length === 2 ? true : undefined), 120_000);
  };
  const everyHostJoined = (id: string) =>
    waitFor(`every host in lockspace ${id}`, async () => (mesh.hosts.every((h) => sanlockLockspaces(h, true).includes(id)) ? true : undefined), 90_000);

  /** What must come back: every disk as GetDisk shows it (paths aside) and the guest-visible checksum of its leaf. */
  const inventory = async (domain: pb.StorageDomain) => {
    const mover = createClient(pb.DataMoverServiceDefinition, mesh.hosts[0]!.services['data-mover']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
    try {
      const { disks } = await api.disks.listDisks({ storageDomainId: domain.id });
      const out: Record<string, unknown> = {};
      for (const d of disks.sort((a, b) => a.id.localeCompare(b.id))) {
        const leaf = d.volumes[d.volumes.length - 1]!;
        const { checksum } = await mover.checksumVolume({ volume: { domainPath: domain.path, imageId: d.id, volumeId: leaf.id } }, { timeoutMs: 60_000 });
        out[d.id] = {
          description: d.description,
          template: d.template,
          templateDiskId: d.templateDiskId,
          legality: d.legality,
          chain: d.volumes.map((v) => [v.id, v.parentId, v.format, v.capacityBytes, v.legality, v.generation]),
          checksum,
        };
      }
      return out;
    } finally {
      mover.close();
    }
  };

  let domain: pb.StorageDomain;
  let before: Record<string, unknown>;

  beforeAll(startMesh, 240_000);
  afterAll(async () => {
    api?.close();
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  test('a domain with chains, a qcow2 disk, a template and a thin clone, written by qemu-io', async () => {
    const op = await done(api.domains.createStorageDomain({ requestId: 'create-dr', name: 'dr', path: path.join(mesh.storageDir, 'dr') }));
    domain = op.result?.$case === 'storageDomain' ? op.result.storageDomain : pb.StorageDomain.fromPartial({});
    // A raw base with random data, a snapshot on it with its own writes.
    const chain = diskOf(await done(api.disks.createDisk({ requestId: 'chain', storageDomainId: domain.id, capacityBytes: 32 * MiB, description: 'chain' })));
    const fd = fs.openSync(chain.volumes[0]!.path, 'r+');
    fs.writeSync(fd, randomBytes(8 * MiB), 0, 8 * MiB, 2 * MiB);
    fs.closeSync(fd);
    const snap = diskOf(await done(api.disks.snapshotDisk({ requestId: 'chain-snap', storageDomainId: domain.id, diskId: chain.id, description: 's1' })));
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 4M 2M', '-c', 'write -P 0x33 20M 1M', snap.volumes[1]!.path]);
    await done(api.disks.snapshotDisk({ requestId: 'chain-snap-2', storageDomainId: domain.id, diskId: chain.id, description: 's2' }));
    // A qcow2 disk.
    const q = diskOf(
      await done(
        api.disks.createDisk({ requestId: 'qcow2', storageDomainId: domain.id, capacityBytes: 16 * MiB, format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 }),
      ),
    );
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 1M 3M', q.volumes[0]!.path]);
    // A template and a thin clone of it (a parent in another image).
    const base = diskOf(await done(api.disks.createDisk({ requestId: 'template', storageDomainId: domain.id, capacityBytes: 16 * MiB })));
    const tfd = fs.openSync(base.volumes[0]!.path, 'r+');
    fs.writeSync(tfd, randomBytes(4 * MiB), 0, 4 * MiB, 0);
    fs.closeSync(tfd);
    await done(api.disks.markDiskTemplate({ requestId: 'mark', storageDomainId: domain.id, diskId: base.id }));
    const clone = diskOf(await done(api.disks.cloneDisk({ requestId: 'clone', storageDomainId: domain.id, templateDiskId: base.id })));
    const spec = JSON.stringify({
      driver: 'qcow2',
      file: { driver: 'file', filename: clone.volumes[0]!.path },
      backing: { driver: 'raw', file: { driver: 'file', filename: base.volumes[0]!.path } },
    });
    await run('qemu-io', ['-c', 'write -P 0x11 1M 1M', `json:${spec}`]);

    before = await inventory(domain);
    expect(Object.keys(before)).toHaveLength(4);
    expect(Object.values(before).map((d) => (d as { chain: unknown[] }).chain.length)).toEqual(expect.arrayContaining([3, 1, 1, 1]));
  });

  test('the mesh stopped, NATS storage wiped, a fresh mesh started: attach by path brings back the same domain, disks, chains and checksums', async () => {
    api.close();
    await mesh.stop();
    fs.rmSync(path.join(dir, 'nats', 'jetstream'), { recursive: true, force: true });
    mesh = new LocalMesh(meshOptions);
    await startMesh();
    expect((await api.domains.listStorageDomains({})).storageDomains).toEqual([]);
    for (const h of mesh.hosts) expect([h.name, sanlockLockspaces(h)]).toEqual([h.name, []]);

    const attached = await done(api.domains.attachStorageDomain({ requestId: 'attach-dr', path: domain.path }));
    expect(attached.steps.map((s) => s.name)).toEqual(['inventory', 'epoch', 'register-domain', 'connect-hosts']);
    const got = attached.result?.$case === 'storageDomain' ? attached.result.storageDomain : undefined;
    expect(got).toMatchObject({ id: domain.id, name: 'dr', path: domain.path, imageCount: 4, status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE });
    await everyHostJoined(domain.id);
    console.log(
      `attach of a 4-disk domain on a fresh mesh: ${tookMs(attached)} ms; every host joined ${Date.now() - attached.createTime!.getTime()} ms after the request`,
    );
    expect(await inventory(domain)).toEqual(before);
    // The same path or id again: refused, nothing changed.
    expect(await codeOf(api.domains.attachStorageDomain({ requestId: 'attach-dr-again', path: domain.path }))).toEqual([
      'ALREADY_EXISTS',
      'DOMAIN_PATH_IN_USE',
    ]);
    // And it works: a snapshot of the recovered chain.
    const chainId = Object.entries(before).find(([, d]) => (d as { description: string }).description === 'chain')![0];
    await done(api.disks.snapshotDisk({ requestId: 'after-attach', storageDomainId: domain.id, diskId: chainId }));
  }, 300_000);

  test('detach (remove with keep_data) leaves the disks on storage and no host in the lockspace; attaching again brings them back', async () => {
    expect(await codeOf(api.domains.removeStorageDomain({ requestId: 'remove-full', storageDomainId: domain.id }))).toEqual([
      'FAILED_PRECONDITION',
      'DOMAIN_NOT_EMPTY',
    ]);
    const detached = await done(api.domains.removeStorageDomain({ requestId: 'detach', storageDomainId: domain.id, keepData: true }));
    expect(detached.steps.map((s) => s.name)).toEqual(['mark-removing', 'leave-lockspaces', 'unregister-domain']);
    for (const h of mesh.hosts) expect([h.name, sanlockLockspaces(h)]).toEqual([h.name, []]);
    expect(fs.readdirSync(path.join(domain.path, 'images')).filter((n) => /^[0-9a-f-]{36}$/.test(n))).toHaveLength(4);
    await sleep(2000); // heartbeats: nobody joins a detached domain
    for (const h of mesh.hosts) expect([h.name, sanlockLockspaces(h)]).toEqual([h.name, []]);

    await done(api.domains.attachStorageDomain({ requestId: 'attach-dr-2', path: domain.path }));
    await everyHostJoined(domain.id);
    const { disks } = await api.disks.listDisks({ storageDomainId: domain.id });
    expect(disks.map((d) => d.id).sort()).toEqual(Object.keys(before).sort());
  });
});
