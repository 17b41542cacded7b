import { createClient, pb } from '@sdmesh/common';
import { waitFor } from '../harness/lifecycle';
import { codeOf, MiB, SchedulerMesh, sha256File, writeQcow2, writeRandom } from '../harness/scheduler-mesh';

/**
 * The public API end to end on a real mesh: nats-server, 3 sanlock hosts, every service as
 * its own process. Move Disk with a 2-volume chain, idempotent request ids, engine locks,
 * bad inputs on every RPC.
 */
describe('scheduler: public API on a real mesh', () => {
  const m = new SchedulerMesh(3, { SDMESH_COPY_RATE_LIMIT: String(32 * MiB) });
  let a: pb.StorageDomain;
  let b: pb.StorageDomain;

  beforeAll(async () => {
    await m.start();
    [a, b] = await Promise.all([m.createDomain('dom-a'), m.createDomain('dom-b')]);
  }, 120_000);
  afterAll(() => m.stop(), 60_000);

  test('domains are created, registered, joined by the hosts and listed', async () => {
    expect(a.status).toBe(pb.DomainStatus.DOMAIN_STATUS_ACTIVE);
    const { storageDomains } = await m.api.domains.listStorageDomains({});
    expect(storageDomains.map((d) => d.id).sort()).toEqual([a.id, b.id].sort());
    // Every host was asked to join each new lockspace (joins take sanlock's seconds, more on a busy machine).
    const until = Date.now() + 90_000;
    let got: pb.StorageDomain;
    do {
      got = await m.api.domains.getStorageDomain({ storageDomainId: a.id });
      if (got.hostsConnected.length === 3) break;
      await new Promise((r) => setTimeout(r, 500));
    } while (Date.now() < until);
    expect(got.hostsConnected).toEqual(['host1', 'host2', 'host3']);
    expect(got.capacityBytes).toBeGreaterThan(0);
  });

  test('Move Disk end to end: chain preserved, checksum matches, source gone, steps streamed, events on NATS', async () => {
    const disk = await m.createDisk(a.id, 64 * MiB, 'disk-move-1', { description: 'to move' });
    const base = disk.volumes[0]!;
    writeRandom(base.path, 0, 24);
    const snap = await m.done(m.api.disks.snapshotDisk({ requestId: 'snap-move-1', storageDomainId: a.id, diskId: disk.id }));
    const chain = snap.result?.$case === 'disk' ? snap.result.disk.volumes : [];
    expect(chain).toHaveLength(2);
    writeQcow2(chain[1]!.path, 8, 8, 0x33);
    const host1 = m.mesh.hosts[0]!.services['data-mover']!.grpcAddress;
    const mover = createClient(pb.DataMoverServiceDefinition, host1, m.mesh.credentials({ kind: 'scheduler' }));
    const before = await mover.checksumVolume({ volume: { domainPath: a.path, imageId: disk.id, volumeId: chain[1]!.id } }, { timeoutMs: 60_000 });
    const baseSum = sha256File(base.path);

    const first = await m.api.disks.moveDisk({ requestId: 'move-1', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    // The same request again: the same operation. Another move of the same disk: refused, naming the first.
    const again = await m.api.disks.moveDisk({ requestId: 'move-1', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    expect(again.name).toBe(first.name);
    const second = m.api.disks.moveDisk({ requestId: 'move-2', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    await expect(second).rejects.toMatchObject({ code: 10, reason: 'LOCKED' });
    await expect(second).rejects.toThrow(first.name);
    // The same request_id with a different request is refused.
    expect(await codeOf(m.api.disks.moveDisk({ requestId: 'move-1', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: a.id }))).toEqual([
      'ALREADY_EXISTS',
      'REQUEST_ID_REUSED',
    ]);

    const streamed: pb.Operation[] = [];
    for await (const op of m.api.ops.watchOperation({ name: first.name }, { timeoutMs: 120_000 })) streamed.push(op);
    const final = streamed[streamed.length - 1]!;
    expect(final.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(final.steps.map((s) => s.name)).toEqual([
      'inspect-source',
      `create-target:${chain[0]!.id}`,
      `create-target:${chain[1]!.id}`,
      // The volumes of the chain copy at once (issue 17), after every target volume exists.
      `copy-volume:${chain[0]!.id}`,
      `copy-volume:${chain[1]!.id}`,
      'delete-source',
    ]);
    expect(final.steps.every((s) => s.status === pb.OperationStatus.OPERATION_STATUS_DONE)).toBe(true);
    expect(final.steps.filter((s) => s.name.startsWith('copy-volume')).every((s) => s.host.startsWith('host'))).toBe(true);
    expect(streamed.length).toBeGreaterThan(3);
    expect(streamed.some((o) => o.currentStep.startsWith('copy-volume'))).toBe(true);
    expect(final.progress?.percent).toBe(100);

    // The target: same ids, both volumes LEGAL, the same guest-visible content.
    const moved = await m.api.disks.getDisk({ storageDomainId: b.id, diskId: disk.id });
    expect(moved.volumes.map((v) => v.id)).toEqual(chain.map((v) => v.id));
    expect(moved.volumes.map((v) => v.parentId)).toEqual(['', chain[0]!.id]);
    expect(moved.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    expect(moved.description).toBe('to move');
    const after = await mover.checksumVolume({ volume: { domainPath: b.path, imageId: disk.id, volumeId: chain[1]!.id } }, { timeoutMs: 60_000 });
    expect(after.checksum).toBe(before.checksum);
    expect(sha256File(moved.volumes[0]!.path)).toBe(baseSum);
    mover.close();
    // The source is gone.
    expect(await codeOf(m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    // NATS carried the operation's events: its steps and its end. The end is published after the
    // operation's record says DONE (and its locks are released), and NATS is another path than
    // the watch stream's: waited for, not expected at the moment the stream ended.
    const events = await waitFor("the move's DONE event on NATS", async () => {
      const got = m.operationEvents(first.name);
      return got.at(-1)?.status === pb.OperationStatus.OPERATION_STATUS_DONE ? got : undefined;
    });
    expect(events.some((e) => e.step.startsWith('copy-volume') && e.host.startsWith('host'))).toBe(true);
    expect(m.events.some(({ event }) => event.payload?.$case === 'volume' && event.payload.volume.operationId === first.name.split('/')[1])).toBe(true);
    // And a retry after the end still returns the same (finished) operation.
    const late = await m.api.disks.moveDisk({ requestId: 'move-1', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: b.id });
    expect(late.name).toBe(first.name);
    expect(late.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const { operations } = await m.api.ops.listOperations({ filter: 'type=MOVE_DISK AND status=DONE' });
    expect(operations.map((o) => o.name)).toContain(first.name);
  });

  test('copy, snapshot, delete; wait_for_locks queues instead of failing', async () => {
    const disk = await m.createDisk(a.id, 16 * MiB, 'disk-copy-1', { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 });
    const copy = await m.api.disks.copyDisk({
      requestId: 'copy-1',
      storageDomainId: a.id,
      diskId: disk.id,
      targetStorageDomainId: b.id,
      collapse: true,
      targetFormat: pb.VolumeFormat.VOLUME_FORMAT_RAW,
    });
    // A delete that waits for the copy's shared lock on the disk.
    const del = m.api.disks.deleteDisk({ requestId: 'delete-after-copy', storageDomainId: a.id, diskId: disk.id, waitForLocks: true });
    const copied = await m.done(Promise.resolve(copy));
    const deleted = await m.done(del);
    expect(copied.result?.$case === 'disk' && copied.result.disk.format).toBe(pb.VolumeFormat.VOLUME_FORMAT_RAW);
    expect(deleted.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    expect(await codeOf(m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id }))).toEqual(['NOT_FOUND', 'DISK_NOT_FOUND']);
    const target = copied.result?.$case === 'disk' ? copied.result.disk : undefined;
    expect(target?.storageDomainId).toBe(b.id);
    expect(target?.volumes).toHaveLength(1);
  });

  test('low space: below the critical threshold new allocations are refused with RESOURCE_EXHAUSTED', async () => {
    const full = await m.createDomain('dom-full', { criticalFreeBytes: 2 ** 50 });
    expect(await codeOf(m.api.disks.createDisk({ requestId: 'on-full', storageDomainId: full.id, capacityBytes: MiB }))).toEqual([
      'RESOURCE_EXHAUSTED',
      'INSUFFICIENT_SPACE',
    ]);
    // The event goes out over NATS, the refusal over gRPC: the refusal can arrive first.
    await waitFor('the LOW_SPACE_CRITICAL event of the full domain', async () =>
      m.events.some(
        ({ event }) =>
          event.payload?.$case === 'domain' &&
          event.payload.domain.kind === pb.DomainEvent_Kind.KIND_LOW_SPACE_CRITICAL &&
          event.payload.domain.domain?.id === full.id,
      )
        ? true
        : undefined,
    );
    const { operations } = await m.api.ops.listOperations({ filter: 'request_id=on-full' });
    expect(operations).toHaveLength(0);
    await m.done(m.api.domains.removeStorageDomain({ requestId: 'remove-full', storageDomainId: full.id }));
    expect(await codeOf(m.api.domains.getStorageDomain({ storageDomainId: full.id }))).toEqual(['NOT_FOUND', 'DOMAIN_NOT_FOUND']);
  });

  test('bad inputs on every public RPC: documented codes, nothing changed', async () => {
    const before = (await m.api.ops.listOperations({ pageSize: 1000 })).operations.length;
    const missing = '00000000-0000-4000-8000-000000000000';
    const disk = await m.createDisk(a.id, MiB, 'disk-bad-inputs');
    const after0 = (await m.api.ops.listOperations({ pageSize: 1000 })).operations.length;
    // A host's lease-manager (the only identity that may send heartbeats), for a host that is not in the mesh.
    const intruder = createClient(
      pb.HostServiceDefinition,
      m.replicas[0]!.grpcAddress,
      m.mesh.credentials({ kind: 'host', host: 'intruder', service: 'lease-manager' }),
    );
    const cases: Array<[string, () => Promise<unknown>, [string, string]]> = [
      [
        'CreateStorageDomain relative path',
        () => m.api.domains.createStorageDomain({ requestId: 'bad-1', name: 'x', path: 'rel/path' }),
        ['INVALID_ARGUMENT', 'INVALID_PATH'],
      ],
      [
        'CreateStorageDomain no name',
        () => m.api.domains.createStorageDomain({ requestId: 'bad-2', name: '', path: '/var/tmp/x' }),
        ['INVALID_ARGUMENT', 'INVALID_TEXT'],
      ],
      [
        'CreateStorageDomain path in use',
        () => m.api.domains.createStorageDomain({ requestId: 'bad-3', name: 'again', path: a.path }),
        ['ALREADY_EXISTS', 'DOMAIN_PATH_IN_USE'],
      ],
      [
        'CreateStorageDomain threshold',
        () => m.api.domains.createStorageDomain({ requestId: 'bad-4', name: 'x', path: '/var/tmp/x', warningFreePercent: 150 }),
        ['INVALID_ARGUMENT', 'INVALID_THRESHOLD'],
      ],
      [
        'CreateStorageDomain bad request id',
        () => m.api.domains.createStorageDomain({ requestId: 'bad id!', name: 'x', path: '/var/tmp/x' }),
        ['INVALID_ARGUMENT', 'INVALID_REQUEST_ID'],
      ],
      ['GetStorageDomain not a uuid', () => m.api.domains.getStorageDomain({ storageDomainId: 'nope' }), ['INVALID_ARGUMENT', 'INVALID_DOMAIN_ID']],
      ['GetStorageDomain unknown', () => m.api.domains.getStorageDomain({ storageDomainId: missing }), ['NOT_FOUND', 'DOMAIN_NOT_FOUND']],
      ['ListStorageDomains bad token', () => m.api.domains.listStorageDomains({ pageToken: 'garbage' }), ['INVALID_ARGUMENT', 'INVALID_PAGE_TOKEN']],
      ['ListStorageDomains negative size', () => m.api.domains.listStorageDomains({ pageSize: -1 }), ['INVALID_ARGUMENT', 'INVALID_PAGE_SIZE']],
      [
        'RemoveStorageDomain not empty',
        () => m.api.domains.removeStorageDomain({ requestId: 'bad-5', storageDomainId: a.id }),
        ['FAILED_PRECONDITION', 'DOMAIN_NOT_EMPTY'],
      ],
      [
        'RemoveStorageDomain unknown',
        () => m.api.domains.removeStorageDomain({ requestId: 'bad-6', storageDomainId: missing }),
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      [
        'CreateDisk zero capacity',
        () => m.api.disks.createDisk({ requestId: 'bad-7', storageDomainId: a.id, capacityBytes: 0 }),
        ['INVALID_ARGUMENT', 'INVALID_CAPACITY'],
      ],
      [
        'CreateDisk unaligned capacity',
        () => m.api.disks.createDisk({ requestId: 'bad-8', storageDomainId: a.id, capacityBytes: 1000 }),
        ['INVALID_ARGUMENT', 'INVALID_CAPACITY'],
      ],
      [
        'CreateDisk unknown format',
        () => m.api.disks.createDisk({ requestId: 'bad-9', storageDomainId: a.id, capacityBytes: MiB, format: 7 as pb.VolumeFormat }),
        ['INVALID_ARGUMENT', 'INVALID_FORMAT'],
      ],
      [
        'CreateDisk unknown domain',
        () => m.api.disks.createDisk({ requestId: 'bad-10', storageDomainId: missing, capacityBytes: MiB }),
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      ['GetDisk bad id', () => m.api.disks.getDisk({ storageDomainId: a.id, diskId: 'x' }), ['INVALID_ARGUMENT', 'INVALID_DISK_ID']],
      ['GetDisk unknown', () => m.api.disks.getDisk({ storageDomainId: a.id, diskId: missing }), ['NOT_FOUND', 'DISK_NOT_FOUND']],
      ['ListDisks unknown domain', () => m.api.disks.listDisks({ storageDomainId: missing }), ['NOT_FOUND', 'DOMAIN_NOT_FOUND']],
      ['DeleteDisk unknown', () => m.api.disks.deleteDisk({ requestId: 'bad-11', storageDomainId: a.id, diskId: missing }), ['NOT_FOUND', 'DISK_NOT_FOUND']],
      [
        'SnapshotDisk unknown',
        () => m.api.disks.snapshotDisk({ requestId: 'bad-12', storageDomainId: a.id, diskId: missing }),
        ['NOT_FOUND', 'DISK_NOT_FOUND'],
      ],
      [
        'CopyDisk unknown target',
        () => m.api.disks.copyDisk({ requestId: 'bad-13', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: missing }),
        ['NOT_FOUND', 'DOMAIN_NOT_FOUND'],
      ],
      [
        'CopyDisk target_format without collapse',
        () =>
          m.api.disks.copyDisk({
            requestId: 'bad-14',
            storageDomainId: a.id,
            diskId: disk.id,
            targetStorageDomainId: b.id,
            targetFormat: pb.VolumeFormat.VOLUME_FORMAT_RAW,
          }),
        ['INVALID_ARGUMENT', 'INVALID_FORMAT'],
      ],
      [
        'MoveDisk same domain',
        () => m.api.disks.moveDisk({ requestId: 'bad-15', storageDomainId: a.id, diskId: disk.id, targetStorageDomainId: a.id }),
        ['INVALID_ARGUMENT', 'SAME_DOMAIN'],
      ],
      [
        'MoveDisk unknown disk',
        () => m.api.disks.moveDisk({ requestId: 'bad-16', storageDomainId: a.id, diskId: missing, targetStorageDomainId: b.id }),
        ['NOT_FOUND', 'DISK_NOT_FOUND'],
      ],
      // This mesh's hosts name no import directories: import is off (tests/integration/import-disk.test.ts turns it on).
      [
        'ImportDisk with import off',
        () => m.api.disks.importDisk({ requestId: 'bad-17', storageDomainId: a.id, host: 'host1', sourcePath: '/var/tmp/sdmesh-no-such-import-file' }),
        ['FAILED_PRECONDITION', 'IMPORT_DISABLED'],
      ],
      ['GetHost unknown', () => m.api.hosts.getHost({ host: 'nohost' }), ['NOT_FOUND', 'HOST_NOT_FOUND']],
      ['GetHost empty', () => m.api.hosts.getHost({ host: '' }), ['INVALID_ARGUMENT', 'INVALID_HOST']],
      ['Heartbeat from a user', () => m.api.hosts.heartbeat({}), ['PERMISSION_DENIED', 'WRONG_IDENTITY']],
      ['Heartbeat empty', () => intruder.heartbeat({}), ['INVALID_ARGUMENT', 'INVALID_HOST']],
      [
        'Heartbeat host id taken',
        () =>
          intruder.heartbeat({ host: { name: 'intruder', hostIds: { x: 1 }, leaseManagerAddress: 'a:1', metadataTxAddress: 'a:2', dataMoverAddress: 'a:3' } }),
        ['ALREADY_EXISTS', 'HOST_ID_IN_USE'],
      ],
      ['GetOperation bad name', () => m.api.ops.getOperation({ name: 'operations/x' }), ['INVALID_ARGUMENT', 'INVALID_OPERATION_NAME']],
      ['GetOperation unknown', () => m.api.ops.getOperation({ name: `operations/${missing}` }), ['NOT_FOUND', 'OPERATION_NOT_FOUND']],
      ['ListOperations bad filter', () => m.api.ops.listOperations({ filter: 'color=red' }), ['INVALID_ARGUMENT', 'INVALID_FILTER']],
      ['CancelOperation unknown', () => m.api.ops.cancelOperation({ name: `operations/${missing}` }), ['NOT_FOUND', 'OPERATION_NOT_FOUND']],
      [
        'WaitOperation negative timeout',
        () => m.api.ops.waitOperation({ name: `operations/${missing}`, timeoutSeconds: -1 }),
        ['INVALID_ARGUMENT', 'INVALID_TIMEOUT'],
      ],
      [
        'WatchOperation unknown',
        async () => {
          for await (const _ of m.api.ops.watchOperation({ name: `operations/${missing}` })) void _;
        },
        ['NOT_FOUND', 'OPERATION_NOT_FOUND'],
      ],
    ];
    const got: Array<[string, [string, string]]> = [];
    for (const [what, call] of cases) got.push([what, await codeOf(call())]);
    expect(got).toEqual(cases.map(([what, , want]) => [what, want]));
    // Nothing changed: no operation was created by any of them, the disk is still there.
    expect((await m.api.ops.listOperations({ pageSize: 1000 })).operations.length).toBe(after0);
    expect(after0).toBe(before + 1);
    expect((await m.api.disks.getDisk({ storageDomainId: a.id, diskId: disk.id })).legality).toBe(pb.Legality.LEGALITY_LEGAL);
  });
});
