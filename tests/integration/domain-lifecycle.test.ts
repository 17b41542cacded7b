import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, pb, subscribeEvents } from '@sdmesh/common';
import { LocalMesh, startService } from '@sdmesh/localmesh';
import { operationDone, operationEnd, sanlockLockspaces, sleep, tookMs, waitFor } from '../harness/lifecycle';
import { codeOf, MiB, publicApi, type PublicApi } from '../harness/scheduler-mesh';
import { makeTestDir, removeTestDir, REPO_ROOT } from '../harness/paths';

/**
 * Domain maintenance, removal and host maintenance on a mesh whose hosts announce themselves
 * (heartbeats every 500 ms) and whose GCs pass over every domain under the storage root every
 * second: what leaves a lockspace stays out of it, as sanlock itself reports
 * (`sanlock client status` of each host's daemon), also on a host whose data-mover was killed.
 */
describe('domain and host lifecycle: deactivate, activate, remove, host maintenance', () => {
  const dir = makeTestDir('lifecycle');
  const mesh = new LocalMesh({
    dir,
    hosts: 3,
    heartbeats: { intervalMs: 500 },
    env: {
      SDMESH_IO_TIMEOUT: '1',
      SDMESH_EVENT_HEARTBEAT_MS: '0',
      SDMESH_HOST_POLL_MS: '500',
      // gc: a pass over every domain under the storage root each second.
      SDMESH_INTERVAL_MS: '1000',
      SDMESH_GRACE_MS: '0',
      // scheduler: copies slow enough to be running when the host goes into maintenance.
      SDMESH_COPY_RATE_LIMIT: String(8 * MiB),
      // scheduler: a leave step gives up on a host that does not answer after 8 s (LEAVE_INCOMPLETE).
      SDMESH_LOCKSPACE_LEAVE_MS: '8000',
    },
  });
  let api: PublicApi;
  let watcher: NatsConnection | undefined;
  const events: pb.Event[] = [];
  const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');

  const end = (p: Promise<pb.Operation>) => operationEnd(api, p);
  const done = (p: Promise<pb.Operation>) => operationDone(api, p);
  const inLockspace = (id: string) => mesh.hosts.filter((h) => sanlockLockspaces(h).includes(id)).map((h) => h.name);
  const createDomain = async (name: string) => {
    const op = await done(api.domains.createStorageDomain({ requestId: `create-${name}`, name, path: path.join(mesh.storageDir, name) }));
    return op.result?.$case === 'storageDomain' ? op.result.storageDomain : pb.StorageDomain.fromPartial({});
  };
  const everyHostJoined = (id: string, hosts = mesh.hosts) =>
    waitFor(`${hosts.map((h) => h.name).join(',')} in lockspace ${id}`, async () =>
      hosts.every((h) => sanlockLockspaces(h, true).includes(id)) ? true : undefined,
    );

  let idle: pb.StorageDomain; // deactivated and activated again
  let doomed: pb.StorageDomain; // removed
  let busy: pb.StorageDomain; // source of the moves
  let stray: pb.StorageDomain; // deactivated while host3's lease-manager is down
  let leftAtMs = 0;

  beforeAll(async () => {
    await mesh.start();
    api = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    watcher = await connect(mesh.nats.connectOptions('sdmctl'));
    subscribeEvents(watcher, (event) => events.push(event));
    await waitFor('three healthy hosts', async () => ((await api.hosts.listHosts({})).hosts.filter((h) => h.healthy).length === 3 ? true : undefined), 120_000);
    [idle, doomed, busy, stray] = await Promise.all(['idle', 'doomed', 'busy', 'stray'].map(createDomain));
    await Promise.all([idle, doomed, busy, stray].map((d) => everyHostJoined(d.id)));
  }, 300_000);
  afterAll(async () => {
    api?.close();
    await watcher?.close().catch(() => undefined);
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  test('bad inputs get their codes and change nothing', async () => {
    const before = (await api.ops.listOperations({ pageSize: 1000 })).operations.length;
    const plain = path.join(mesh.storageDir, 'plain');
    fs.mkdirSync(plain);
    fs.writeFileSync(path.join(plain, 'notes.txt'), 'not a domain');
    const torn = path.join(mesh.storageDir, 'torn');
    fs.mkdirSync(path.join(torn, 'dom_md'), { recursive: true });
    fs.writeFileSync(path.join(torn, 'dom_md', 'metadata'), 'RECORD=sdmesh-domain\nFORMAT_VERSION=1\nDOMAIN_ID=');
    // A copy of a registered domain carries its id.
    const copy = path.join(mesh.storageDir, 'copy-of-idle');
    fs.mkdirSync(path.join(copy, 'dom_md'), { recursive: true });
    fs.mkdirSync(path.join(copy, 'images'));
    fs.copyFileSync(path.join(idle.path, 'dom_md', 'metadata'), path.join(copy, 'dom_md', 'metadata'));
    // dom_md a link to a registered domain's: the record is not read through it.
    const linked = path.join(mesh.storageDir, 'linked');
    fs.mkdirSync(path.join(linked, 'images'), { recursive: true });
    fs.symlinkSync(path.join(idle.path, 'dom_md'), path.join(linked, 'dom_md'));
    const attach = (p: string, i: number) => codeOf(api.domains.attachStorageDomain({ requestId: `bad-attach-${i}`, path: p }));
    const cases: Array<[string, Promise<[string, string]>, [string, string]]> = [
      ['attach a path outside the storage roots', attach(path.join(dir, 'elsewhere'), 1), ['PERMISSION_DENIED', 'DOMAIN_OUTSIDE_STORAGE_ROOTS']],
      ['attach a path with ..', attach(`${mesh.storageDir}/../storage/idle`, 2), ['INVALID_ARGUMENT', 'INVALID_PATH']],
      ['attach a directory that is not a domain', attach(plain, 3), ['NOT_FOUND', 'DOMAIN_NOT_FOUND']],
      ['attach a torn domain record', attach(torn, 4), ['FAILED_PRECONDITION', 'DOMAIN_UNREADABLE']],
      ['attach a registered domain path', attach(idle.path, 5), ['ALREADY_EXISTS', 'DOMAIN_PATH_IN_USE']],
      ['attach a copy of a registered domain (its id is registered)', attach(copy, 6), ['ALREADY_EXISTS', 'DOMAIN_ID_IN_USE']],
      ['attach a directory whose dom_md is a symlink', attach(linked, 7), ['FAILED_PRECONDITION', 'DOMAIN_UNREADABLE']],
      [
        'deactivate an unknown domain',
        codeOf(api.domains.deactivateStorageDomain({ requestId: 'bad-deact', storageDomainId: '3f0c1a2b-0000-4000-8000-000000000000' })),
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      [
        'deactivate "x"',
        codeOf(api.domains.deactivateStorageDomain({ requestId: 'bad-deact-2', storageDomainId: 'x' })),
        ['INVALID_ARGUMENT', 'INVALID_DOMAIN_ID'],
      ],
      [
        'activate an active domain',
        codeOf(api.domains.activateStorageDomain({ requestId: 'bad-act', storageDomainId: idle.id })),
        ['FAILED_PRECONDITION', 'DOMAIN_ALREADY_ACTIVE'],
      ],
      ['maintenance of an unknown host', codeOf(api.hosts.startHostMaintenance({ requestId: 'bad-hm', host: 'host9' })), ['NOT_FOUND', 'HOST_NOT_FOUND']],
      ['maintenance of host "../x"', codeOf(api.hosts.startHostMaintenance({ requestId: 'bad-hm-2', host: '../x' })), ['INVALID_ARGUMENT', 'INVALID_HOST']],
      [
        'activate a host not in maintenance',
        codeOf(api.hosts.activateHost({ requestId: 'bad-ah', host: 'host1' })),
        ['FAILED_PRECONDITION', 'HOST_ALREADY_ACTIVE'],
      ],
    ];
    for (const [what, got, want] of cases) expect([what, await got]).toEqual([what, want]);
    expect((await api.ops.listOperations({ pageSize: 1000 })).operations.length).toBe(before);
    expect((await api.domains.listStorageDomains({})).storageDomains.map((d) => d.id).sort()).toEqual([idle.id, doomed.id, busy.id, stray.id].sort());
  });

  test("deactivate and remove with host3's data-mover killed: every host's sanlock leaves the lockspace", async () => {
    const host3 = mesh.hosts[2]!;
    await host3.services['data-mover']!.process.stop('SIGKILL');
    await waitFor('host3 unhealthy', async () => ((await api.hosts.getHost({ host: 'host3' })).healthy ? undefined : true));

    const deactivated = await done(api.domains.deactivateStorageDomain({ requestId: 'deactivate-idle', storageDomainId: idle.id }));
    expect(deactivated.steps.map((s) => s.name)).toEqual(['mark-maintenance', 'leave-lockspaces']);
    // The same request again: the same operation (request_id idempotency), not a refusal.
    expect((await api.domains.deactivateStorageDomain({ requestId: 'deactivate-idle', storageDomainId: idle.id })).name).toBe(deactivated.name);
    expect(inLockspace(idle.id)).toEqual([]);
    const removed = await done(api.domains.removeStorageDomain({ requestId: 'remove-doomed', storageDomainId: doomed.id }));
    expect(removed.steps.map((s) => s.name)).toEqual(['check-empty', 'mark-removing', 'leave-lockspaces', 'unregister-domain']);
    expect(inLockspace(doomed.id)).toEqual([]);
    leftAtMs = Date.now();
    console.log(`with host3's data-mover dead: deactivate took ${tookMs(deactivated)} ms, remove ${tookMs(removed)} ms (3 hosts left, io_timeout 1)`);

    // The deactivated domain: shown in MAINTENANCE, every operation on it refused, nothing created.
    const shown = await api.domains.getStorageDomain({ storageDomainId: idle.id });
    expect(shown.status).toBe(pb.DomainStatus.DOMAIN_STATUS_MAINTENANCE);
    expect(shown.hostsConnected).toEqual([]);
    expect(await codeOf(api.disks.createDisk({ requestId: 'on-deactivated', storageDomainId: idle.id, capacityBytes: MiB }))).toEqual([
      'FAILED_PRECONDITION',
      'DOMAIN_IN_MAINTENANCE',
    ]);
    expect(await codeOf(api.domains.deactivateStorageDomain({ requestId: 'deactivate-again', storageDomainId: idle.id }))).toEqual([
      'FAILED_PRECONDITION',
      'DOMAIN_IN_MAINTENANCE',
    ]);
    expect((await api.disks.listDisks({ storageDomainId: idle.id })).disks).toEqual([]);
    expect(await codeOf(api.domains.getStorageDomain({ storageDomainId: doomed.id }))).toEqual(['NOT_FOUND', 'DOMAIN_NOT_FOUND']);
    const domainEvents = await waitFor('domain events', async () => {
      const seen = events.flatMap((e) => (e.payload?.$case === 'domain' ? [[e.payload.domain.kind, e.payload.domain.domain?.id]] : []));
      return seen.length >= 2 ? seen : undefined;
    });
    expect(domainEvents).toEqual(
      expect.arrayContaining([
        [pb.DomainEvent_Kind.KIND_DEACTIVATED, idle.id],
        [pb.DomainEvent_Kind.KIND_REMOVED, doomed.id],
      ]),
    );
  });

  test('a host whose lease-manager is down: the leave reports it (LEAVE_INCOMPLETE), and once it is back the scheduler makes it leave', async () => {
    const host3 = mesh.hosts[2]!;
    const old = host3.services['lease-manager']!;
    await old.process.stop('SIGKILL');
    const failed = await end(api.domains.deactivateStorageDomain({ requestId: 'deactivate-stray', storageDomainId: stray.id }));
    expect([pb.OperationStatus[failed.status], failed.error?.reason]).toEqual(['OPERATION_STATUS_FAILED', 'LEAVE_INCOMPLETE']);
    expect(failed.error?.message).toMatch(/host3/);
    // Its sanlock daemon is still in the lockspace; the domain stays deactivated (no operation runs on it).
    expect(inLockspace(stray.id)).toEqual(['host3']);
    expect((await api.domains.getStorageDomain({ storageDomainId: stray.id })).status).toBe(pb.DomainStatus.DOMAIN_STATUS_MAINTENANCE);
    const lm = await startService('lease-manager', {
      host: host3.name,
      env: mesh.hostServiceEnv(host3, 'lease-manager', {
        SDMESH_IO_TIMEOUT: '1',
        SDMESH_GRPC_PORT: String(old.grpcPort),
        SDMESH_SCHEDULER_ADDRESS: mesh.scheduler!.grpcAddress,
        SDMESH_HEARTBEAT_INTERVAL_MS: '500',
        SDMESH_METADATA_TX_ADDRESS: host3.services['metadata-tx']!.grpcAddress,
        SDMESH_DATA_MOVER_ADDRESS: host3.services['data-mover']!.grpcAddress,
        SDMESH_GC_ADDRESS: host3.services.gc!.grpcAddress,
      }),
      logFile: path.join(mesh.logDir, 'host3-lease-manager-2.log'),
    });
    host3.services['lease-manager'] = lm;
    await waitFor('host3 out of the lockspace', async () => (inLockspace(stray.id).length === 0 ? true : undefined), 120_000);
  }, 300_000);

  test('host maintenance during 8 concurrent moves: no new step lands on the host, every move finishes, then it is in no lockspace', async () => {
    // Eight disks with 16 MiB of data each (written straight into their raw files: nothing runs on them yet).
    const disks: pb.Disk[] = [];
    for (let i = 0; i < 8; i++) {
      const op = await done(api.disks.createDisk({ requestId: `busy-disk-${i}`, storageDomainId: busy.id, capacityBytes: 32 * MiB }));
      const disk = op.result?.$case === 'disk' ? op.result.disk : pb.Disk.fromPartial({});
      const fd = fs.openSync(disk.volumes[0]!.path, 'r+');
      fs.writeSync(fd, randomBytes(16 * MiB), 0, 16 * MiB, 4 * MiB);
      fs.closeSync(fd);
      disks.push(disk);
    }
    const target = await createDomain('target');
    await everyHostJoined(target.id, mesh.hosts.slice(0, 2));
    const moves = await Promise.all(
      disks.map((d, i) =>
        api.disks.moveDisk({ requestId: `move-${i}`, storageDomainId: busy.id, diskId: d.id, targetStorageDomainId: target.id, waitForLocks: true }),
      ),
    );
    // Once some copies run, host2 goes into maintenance.
    await waitFor('a copy running', async () => {
      const ops = await Promise.all(moves.map((m) => api.ops.getOperation({ name: m.name })));
      return ops.some((o) => o.steps.some((s) => s.name.startsWith('copy-volume') && s.status === pb.OperationStatus.OPERATION_STATUS_RUNNING))
        ? true
        : undefined;
    });
    const maintenance = await done(api.hosts.startHostMaintenance({ requestId: 'maintain-host2', host: 'host2' }));
    expect(maintenance.steps.map((s) => s.name)).toEqual(['mark-maintenance', 'drain', 'leave-lockspaces', 'in-maintenance']);
    const markedAt = maintenance.steps[0]!.endTime!.getTime();
    // Left every lockspace, and says so.
    expect(sanlockLockspaces(mesh.hosts[1]!)).toEqual([]);
    const host2 = await api.hosts.getHost({ host: 'host2' });
    expect(host2.maintenance).toBe(true);
    expect(host2.hostIds).toEqual({});

    const ended = await Promise.all(moves.map((m) => end(Promise.resolve(m))));
    // Each with its error, so a move that did not end DONE says why.
    expect(ended.map((o) => ({ status: pb.OperationStatus[o.status], error: o.error }))).toEqual(
      ended.map(() => ({ status: 'OPERATION_STATUS_DONE', error: undefined })),
    );
    const stepsOnHost2 = ended.flatMap((o) => o.steps.filter((s) => s.host === 'host2'));
    const lateOnHost2 = stepsOnHost2.filter((s) => s.startTime!.getTime() > markedAt);
    expect(lateOnHost2.map((s) => s.name)).toEqual([]);
    const drainMs = maintenance.steps[1]!.endTime!.getTime() - maintenance.steps[1]!.startTime!.getTime();
    console.log(
      `8 moves: ${stepsOnHost2.length} steps ran on host2, all started before its maintenance (drain ${drainMs} ms), ` +
        `${ended.flatMap((o) => o.steps).filter((s) => s.host === 'host1').length} on host1`,
    );
    // Published by the scheduler over NATS (another path than the operation's answer): waited for.
    const hostEvents = () => events.flatMap((e) => (e.payload?.$case === 'host' && e.payload.host.host === 'host2' ? [e.payload.host.kind] : []));
    await waitFor('host2 KIND_MAINTENANCE event', async () => (hostEvents().includes(pb.HostEvent_Kind.KIND_MAINTENANCE) ? true : undefined));
    // An import pinned to a host in maintenance is refused.
    expect(
      await codeOf(api.disks.importDisk({ requestId: 'import-on-host2', storageDomainId: target.id, host: 'host2', sourcePath: '/nonexistent/file.raw' })),
    ).toEqual(['FAILED_PRECONDITION', 'HOST_IN_MAINTENANCE']);

    // Heartbeats keep coming from host2 meanwhile: it stays out.
    await sleep(3000);
    expect(sanlockLockspaces(mesh.hosts[1]!)).toEqual([]);
    await done(api.hosts.activateHost({ requestId: 'activate-host2', host: 'host2' }));
    await everyHostJoined(target.id, [mesh.hosts[1]!]);
    await everyHostJoined(busy.id, [mesh.hosts[1]!]);
    expect(sanlockLockspaces(mesh.hosts[1]!)).not.toContain(idle.id);
    expect((await api.hosts.getHost({ host: 'host2' })).maintenance).toBe(false);
  });

  test('a minute of GC passes and heartbeats later, no host is in the deactivated or removed lockspace, and no host shows liveness there', async () => {
    await sleep(Math.max(0, leftAtMs + 60_000 - Date.now()));
    for (const id of [idle.id, doomed.id, stray.id]) expect([id, inLockspace(id)]).toEqual([id, []]);
    for (const h of (await api.hosts.listHosts({})).hosts) {
      expect(Object.keys(h.liveness)).not.toContain(idle.id);
      expect(Object.keys(h.liveness)).not.toContain(doomed.id);
      expect(h.reachableDomains).not.toContain(idle.id);
    }
    // The GCs did try: their passes over those domains stop at the lease-manager's refusal.
    const gc = createClient(pb.GcServiceDefinition, mesh.hosts[0]!.services.gc!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
    try {
      const passes = (await gc.getGcStatus({})).lastPasses.filter((p) => p.domainPath === idle.path || p.domainPath === doomed.path);
      expect(passes.length).toBe(2);
      for (const p of passes) expect(p.notCollectedReason).toMatch(/left the domain's lockspace on the scheduler's order/);
    } finally {
      gc.close();
    }
  }, 180_000);

  test('sdmctl domains activate brings the domain back: hosts join it and disks can be created again', async () => {
    const env = {
      ...process.env,
      SDMESH_ADDRESS: mesh.scheduler!.grpcAddress,
      ...mesh.nats.clientEnv('sdmctl'),
      ...mesh.tlsEnv({ kind: 'user', name: 'admin' }),
    };
    const out = await new Promise<string>((resolve, reject) =>
      execFile(process.execPath, [SDMCTL, 'domains', 'activate', idle.id, '--wait'], { env, timeout: 60_000 }, (err, stdout, stderr) =>
        err ? reject(new Error(`${String(err)} ${stderr}`)) : resolve(stdout),
      ),
    );
    expect(out).toMatch(/DONE|done/);
    expect((await api.domains.getStorageDomain({ storageDomainId: idle.id })).status).toBe(pb.DomainStatus.DOMAIN_STATUS_ACTIVE);
    // host3's data-mover is still down, but its lease-manager joins too.
    await everyHostJoined(idle.id);
    await done(api.disks.createDisk({ requestId: 'after-activate', storageDomainId: idle.id, capacityBytes: MiB }));
  });
});
