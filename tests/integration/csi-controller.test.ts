import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, csi, openKv, pb, type ServiceClient } from '@sdmesh/common';
import { waitFor } from '@sdmesh/localmesh';
import { runCli } from '@sdmesh/sdmctl';
import { codeOf, MiB, SchedulerMesh, writeRandom } from '../harness/scheduler-mesh';

/**
 * The CSI controller against a real mesh (2 sanlock hosts, nats-server, scheduler, the
 * controller on its unix socket, spoken to with the generated csi.v1 client; each host's node
 * plugin for the shared raw block volume): every call idempotent, the spec's error codes, names,
 * snapshots that outlive their volume, and the publish rules with a dead host — an exclusive
 * volume fenced, a shared one left to the live host that still writes it.
 */
const Mode = csi.VolumeCapability_AccessMode_Mode;
const mount = (mode = Mode.SINGLE_NODE_WRITER): csi.VolumeCapability => ({
  accessType: { $case: 'mount', mount: { fsType: 'ext4', mountFlags: [], volumeMountGroup: '' } },
  accessMode: { mode },
});
const block = (mode = Mode.SINGLE_NODE_WRITER): csi.VolumeCapability => ({ accessType: { $case: 'block', block: {} }, accessMode: { mode } });

describe('CSI controller', () => {
  const sm = new SchedulerMesh(2);
  let ctl: ServiceClient<typeof csi.ControllerDefinition>;
  let ident: ServiceClient<typeof csi.IdentityDefinition>;
  let domain: pb.StorageDomain;
  let params: Record<string, string>;
  let nats: NatsConnection | undefined;
  const call = { timeoutMs: 120_000 };
  /** Volumes staged through a node plugin, unstaged at the end even when a test failed. */
  const staged = new Map<string, { node: string; volumeId: string; staging: string; target: string }>();

  const create = (name: string, extra: Partial<csi.CreateVolumeRequest> = {}) =>
    ctl.createVolume({ name, capacityRange: { requiredBytes: 64 * MiB, limitBytes: 0 }, volumeCapabilities: [mount()], parameters: params, ...extra }, call);
  const diskOf = async (volumeId: string) => sm.api.disks.getDisk({ storageDomainId: domain.id, diskId: volumeId.split('/')[1]! });
  const checksum = async (volumeId: string) => {
    const d = await diskOf(volumeId);
    const leaf = d.volumes[d.volumes.length - 1]!;
    const mover = createClient(
      pb.DataMoverServiceDefinition,
      sm.hostOf('host1').services['data-mover']!.grpcAddress,
      sm.mesh.credentials({ kind: 'scheduler' }),
    );
    try {
      return (await mover.checksumVolume({ volume: { domainPath: domain.path, imageId: d.id, volumeId: leaf.id } }, { timeoutMs: 60_000 })).checksum;
    } finally {
      mover.close();
    }
  };

  beforeAll(async () => {
    await sm.start();
    domain = await sm.createDomain('csi');
    params = { domain: domain.id, format: 'raw', 'csi.storage.k8s.io/pvc/name': 'ignored' };
    await sm.mesh.startCsi({ schedulerAddress: sm.replicas[0]!.grpcAddress });
    const endpoint = sm.mesh.csiController!.endpoint;
    ctl = createClient(csi.ControllerDefinition, endpoint, grpc.credentials.createInsecure());
    ident = createClient(csi.IdentityDefinition, endpoint, grpc.credentials.createInsecure());
  }, 180_000);

  afterAll(async () => {
    for (const d of [...staged.values()]) await detach(d).catch(() => undefined);
    ctl?.close();
    ident?.close();
    await nats?.close();
    await sm.stop();
  }, 120_000);

  const nodeClient = (node: string) => createClient(csi.NodeDefinition, sm.hostOf(node).csiNode!.endpoint, grpc.credentials.createInsecure());
  /** NodeStage + NodePublish of a raw block volume on a node, with the controller's publish context; returns the device file. */
  const attachBlock = async (node: string, volumeId: string, cap: csi.VolumeCapability, publishContext: Record<string, string>) => {
    const dir = path.join(sm.dir, 'csi-volumes', `${node}-${volumeId.split('/')[1]}`);
    const d = { node, volumeId, staging: path.join(dir, 'staging'), target: path.join(dir, 'target') };
    fs.mkdirSync(d.staging, { recursive: true });
    staged.set(`${node}/${volumeId}`, d);
    const client = nodeClient(node);
    try {
      const req = { volumeId, stagingTargetPath: d.staging, volumeCapability: cap, publishContext, secrets: {}, volumeContext: {} };
      await client.nodeStageVolume(req, call);
      await client.nodePublishVolume({ ...req, targetPath: d.target, readonly: false }, call);
    } finally {
      client.close();
    }
    return d.target;
  };
  const detach = async (d: { node: string; volumeId: string; staging: string; target: string }) => {
    const client = nodeClient(d.node);
    try {
      await client.nodeUnpublishVolume({ volumeId: d.volumeId, targetPath: d.target }, call);
      await client.nodeUnstageVolume({ volumeId: d.volumeId, stagingTargetPath: d.staging }, call);
      staged.delete(`${d.node}/${d.volumeId}`);
    } finally {
      client.close();
    }
  };
  /** 4 KiB at block `at` of a device, written / read with O_DIRECT (past any page cache, as a guest does). */
  const writeBlock = (device: string, at: number, data: Buffer) => {
    const src = path.join(sm.dir, `block-${at}.bin`);
    fs.writeFileSync(src, data);
    execFileSync('dd', [`if=${src}`, `of=${device}`, 'bs=4k', `seek=${at}`, 'count=1', 'oflag=direct', 'conv=notrunc', 'status=none']);
  };
  const readBlock = (device: string, at: number) => execFileSync('dd', [`if=${device}`, 'bs=4k', `skip=${at}`, 'count=1', 'iflag=direct', 'status=none']);

  it('says who it is and what it offers', async () => {
    expect((await ident.getPluginInfo({})).name).toBe('csi.sdmesh.io');
    expect((await ident.probe({})).ready).toBe(true);
    const caps = (await ctl.controllerGetCapabilities({})).capabilities.map((c) =>
      c.type?.$case === 'rpc' ? csi.controllerServiceCapability_RPC_TypeToJSON(c.type.rpc.type) : '?',
    );
    expect(caps.sort()).toEqual(
      [
        'CREATE_DELETE_VOLUME',
        'PUBLISH_UNPUBLISH_VOLUME',
        'LIST_VOLUMES',
        'GET_CAPACITY',
        'CREATE_DELETE_SNAPSHOT',
        'LIST_SNAPSHOTS',
        'CLONE_VOLUME',
        'PUBLISH_READONLY',
        'EXPAND_VOLUME',
        'LIST_VOLUMES_PUBLISHED_NODES',
        'VOLUME_CONDITION',
        'GET_VOLUME',
      ].sort(),
    );
  });

  it('creates, lists, expands and deletes volumes idempotently; names of 128 bytes; a name reused after its delete', async () => {
    const name = 'pvc-ä/:' + 'x'.repeat(128 - Buffer.byteLength('pvc-ä/:'));
    expect(Buffer.byteLength(name)).toBe(128);
    const a = (await create(name)).volume!;
    const again = (await create(name)).volume!;
    expect(again.volumeId).toBe(a.volumeId);
    expect(a.capacityBytes).toBe(64 * MiB);
    expect(a.accessibleTopology[0]!.segments).toEqual({ [`topology.csi.sdmesh.io/domain-${domain.id}`]: 'true' });
    const disk = await diskOf(a.volumeId);
    expect(disk.description).toContain('csi-volume ');

    // Refusals, each before anything is created.
    expect(await codeOf(create(name + 'y'))).toEqual(['INVALID_ARGUMENT', 'INVALID_ARGUMENT']); // 129 bytes
    expect((await codeOf(create(name, { capacityRange: { requiredBytes: 128 * MiB, limitBytes: 0 } })))[0]).toBe('ALREADY_EXISTS');
    expect((await codeOf(create('')))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(create('no-caps', { volumeCapabilities: [] })))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(create('rwx-fs', { volumeCapabilities: [mount(Mode.MULTI_NODE_MULTI_WRITER)] })))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(create('bad-param', { parameters: { ...params, colour: 'blue' } })))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(create('range', { capacityRange: { requiredBytes: 10 * MiB, limitBytes: 5 * MiB } })))[0]).toBe('OUT_OF_RANGE');
    expect(
      (await codeOf(create('no-snap', { volumeContentSource: { type: { $case: 'snapshot', snapshot: { snapshotId: `${domain.id}/${domain.id}` } } } })))[0],
    ).toBe('NOT_FOUND');
    const listed = (await sm.api.disks.listDisks({ storageDomainId: domain.id })).disks;
    expect(listed.map((d) => d.id)).toEqual([disk.id]);

    // Validate, get, list (paged), capacity.
    const v = await ctl.validateVolumeCapabilities({ volumeId: a.volumeId, volumeCapabilities: [block(Mode.MULTI_NODE_MULTI_WRITER)] });
    expect(v.confirmed?.volumeCapabilities).toHaveLength(1);
    expect(
      (await ctl.validateVolumeCapabilities({ volumeId: a.volumeId, volumeCapabilities: [mount(Mode.MULTI_NODE_SINGLE_WRITER)] })).confirmed,
    ).toBeUndefined();
    expect((await codeOf(ctl.validateVolumeCapabilities({ volumeId: `${domain.id}/${domain.id}`, volumeCapabilities: [mount()] })))[0]).toBe('NOT_FOUND');
    const got = await ctl.controllerGetVolume({ volumeId: a.volumeId });
    expect(got.status?.volumeCondition?.abnormal).toBe(false);
    expect((await codeOf(ctl.controllerGetVolume({ volumeId: 'not-a-volume' })))[0]).toBe('NOT_FOUND');
    const b = (await create('second')).volume!;
    const page1 = await ctl.listVolumes({ maxEntries: 1, startingToken: '' });
    expect(page1.entries).toHaveLength(1);
    const page2 = await ctl.listVolumes({ maxEntries: 1, startingToken: page1.nextToken });
    const rest = page2.nextToken ? (await ctl.listVolumes({ maxEntries: 0, startingToken: page2.nextToken })).entries : [];
    expect([...page1.entries, ...page2.entries, ...rest].map((e) => e.volume!.volumeId).sort()).toEqual([a.volumeId, b.volumeId].sort());
    expect((await codeOf(ctl.listVolumes({ maxEntries: 1, startingToken: 'garbage' })))[0]).toBe('ABORTED');
    const cap = await ctl.getCapacity({ volumeCapabilities: [], parameters: params, accessibleTopology: a.accessibleTopology[0] });
    const sd = await sm.api.domains.getStorageDomain({ storageDomainId: domain.id });
    // Free space moves on a shared machine between the two reads: the reserve is what must show.
    expect(cap.availableCapacity).toBeGreaterThan(0);
    expect(sd.criticalFreeBytes).toBeGreaterThan(0);
    expect(Math.abs(cap.availableCapacity - (sd.freeBytes - sd.criticalFreeBytes))).toBeLessThan(sd.criticalFreeBytes / 4);

    // Expand: grows once; the same call again and a smaller size change nothing.
    const grown = await ctl.controllerExpandVolume({ volumeId: b.volumeId, capacityRange: { requiredBytes: 96 * MiB, limitBytes: 0 } }, call);
    expect(grown).toMatchObject({ capacityBytes: 96 * MiB, nodeExpansionRequired: true });
    expect((await ctl.controllerExpandVolume({ volumeId: b.volumeId, capacityRange: { requiredBytes: 96 * MiB, limitBytes: 0 } }, call)).capacityBytes).toBe(
      96 * MiB,
    );
    expect((await ctl.controllerExpandVolume({ volumeId: b.volumeId, capacityRange: { requiredBytes: 32 * MiB, limitBytes: 0 } }, call)).capacityBytes).toBe(
      96 * MiB,
    );
    expect((await codeOf(ctl.controllerExpandVolume({ volumeId: b.volumeId, capacityRange: { requiredBytes: 200 * MiB, limitBytes: 100 * MiB } })))[0]).toBe(
      'OUT_OF_RANGE',
    );
    expect((await diskOf(b.volumeId)).capacityBytes).toBe(96 * MiB);

    // Delete twice, an unknown id, then the name again: a new volume.
    for (let i = 0; i < 2; i++) await ctl.deleteVolume({ volumeId: a.volumeId }, call);
    await ctl.deleteVolume({ volumeId: 'whatever' }, call);
    expect((await codeOf(diskOf(a.volumeId)))[0]).toBe('NOT_FOUND');
    const reborn = (await create(name)).volume!;
    expect(reborn.volumeId).not.toBe(a.volumeId);
    expect((await create(name)).volume!.volumeId).toBe(reborn.volumeId);
    await ctl.deleteVolume({ volumeId: reborn.volumeId }, call);
    await ctl.deleteVolume({ volumeId: b.volumeId }, call);

    // A disk the driver did not create (a PV naming it by hand) is refused, and stays.
    const foreign = await sm.createDisk(domain.id, 8 * MiB, 'csi-test-foreign-disk');
    expect((await codeOf(ctl.deleteVolume({ volumeId: `${domain.id}/${foreign.id}` }, call)))[0]).toBe('FAILED_PRECONDITION');
    expect((await diskOf(`${domain.id}/${foreign.id}`)).id).toBe(foreign.id);
  }, 300_000);

  it('snapshots outlive their volume; restore and clone carry its content', async () => {
    const src = (await create('snap-source')).volume!;
    const srcDisk = await diskOf(src.volumeId);
    writeRandom(srcDisk.volumes[0]!.path, 3, 8);
    const sum = await checksum(src.volumeId);

    const snap = (await ctl.createSnapshot({ sourceVolumeId: src.volumeId, name: 'snap-1', parameters: {} }, call)).snapshot!;
    expect(snap).toMatchObject({ sourceVolumeId: src.volumeId, readyToUse: true, sizeBytes: 64 * MiB });
    expect((await ctl.createSnapshot({ sourceVolumeId: src.volumeId, name: 'snap-1', parameters: {} }, call)).snapshot!.snapshotId).toBe(snap.snapshotId);
    const other = (await create('other')).volume!;
    expect((await codeOf(ctl.createSnapshot({ sourceVolumeId: other.volumeId, name: 'snap-1', parameters: {} }, call)))[0]).toBe('ALREADY_EXISTS');
    expect((await codeOf(ctl.createSnapshot({ sourceVolumeId: `${domain.id}/${domain.id}`, name: 'snap-x', parameters: {} }, call)))[0]).toBe('NOT_FOUND');
    expect(
      (await ctl.listSnapshots({ sourceVolumeId: src.volumeId, maxEntries: 0, startingToken: '', snapshotId: '' })).entries.map((e) => e.snapshot!.snapshotId),
    ).toEqual([snap.snapshotId]);
    // A snapshot is not a volume.
    expect((await ctl.listVolumes({ maxEntries: 0, startingToken: '' })).entries.map((e) => e.volume!.volumeId)).not.toContain(snap.snapshotId);

    const fromSnap = { type: { $case: 'snapshot' as const, snapshot: { snapshotId: snap.snapshotId } } };
    const fromVol = { type: { $case: 'volume' as const, volume: { volumeId: src.volumeId } } };
    expect((await codeOf(create('too-small', { volumeContentSource: fromSnap, capacityRange: { requiredBytes: 0, limitBytes: 32 * MiB } })))[0]).toBe(
      'OUT_OF_RANGE',
    );
    const restored = (await create('restored', { volumeContentSource: fromSnap })).volume!;
    expect((await create('restored', { volumeContentSource: fromSnap })).volume!.volumeId).toBe(restored.volumeId);
    const cloned = (await create('cloned', { volumeContentSource: fromVol })).volume!;
    const bigger = (await create('restored-bigger', { volumeContentSource: fromSnap, capacityRange: { requiredBytes: 80 * MiB, limitBytes: 0 } })).volume!;
    expect(bigger.capacityBytes).toBe(80 * MiB);
    expect(await checksum(restored.volumeId)).toBe(sum);
    expect(await checksum(cloned.volumeId)).toBe(sum);
    // Several writers get one raw image: a full copy, not a thin overlay.
    const rwx = [block(Mode.MULTI_NODE_MULTI_WRITER)];
    expect((await codeOf(create('rwx-qcow2', { volumeCapabilities: rwx, parameters: { ...params, format: 'qcow2' } })))[0]).toBe('INVALID_ARGUMENT');
    const shared = (await create('restored-rwx', { volumeContentSource: fromSnap, volumeCapabilities: rwx })).volume!;
    expect(await diskOf(shared.volumeId)).toMatchObject({ format: pb.VolumeFormat.VOLUME_FORMAT_RAW, templateDiskId: '', volumes: [expect.anything()] });
    expect(await checksum(shared.volumeId)).toBe(sum);

    // The source goes; the snapshot stays and still restores.
    await ctl.deleteVolume({ volumeId: src.volumeId }, call);
    const afterDelete = (await ctl.listSnapshots({ snapshotId: snap.snapshotId, maxEntries: 0, startingToken: '', sourceVolumeId: '' })).entries;
    expect(afterDelete.map((e) => e.snapshot!.snapshotId)).toEqual([snap.snapshotId]);
    const late = (await create('restored-late', { volumeContentSource: fromSnap })).volume!;
    expect(await checksum(late.volumeId)).toBe(sum);

    // A snapshot backing thin restores is in use; once they are gone it is deleted (twice: OK).
    expect(await codeOf(ctl.deleteSnapshot({ snapshotId: snap.snapshotId }, call))).toEqual(['FAILED_PRECONDITION', 'TEMPLATE_HAS_CLONES']);
    for (const v of [restored, bigger, late, cloned, other, shared]) await ctl.deleteVolume({ volumeId: v.volumeId }, call);
    await ctl.deleteSnapshot({ snapshotId: snap.snapshotId }, call);
    await ctl.deleteSnapshot({ snapshotId: snap.snapshotId }, call);
    expect((await ctl.listSnapshots({ maxEntries: 0, startingToken: '', sourceVolumeId: '', snapshotId: '' })).entries).toEqual([]);
  }, 300_000);

  it('publishes to one node at a time (shared for raw block), and a dead node only once sanlock says it is dead', async () => {
    const v = (await create('published')).volume!;
    const pub = (node: string, cap = mount(), readonly = false) =>
      ctl.controllerPublishVolume({ volumeId: v.volumeId, nodeId: node, volumeCapability: cap, readonly }, call);
    const ctx1 = (await pub('host2')).publishContext;
    expect(ctx1).toMatchObject({ access: 'exclusive', readonly: 'false', domainId: domain.id });
    expect((await pub('host2')).publishContext).toEqual(ctx1);
    expect(await codeOf(pub('host2', mount(), true))).toEqual(['ALREADY_EXISTS', 'ATTACHMENT_MISMATCH']);
    expect(await codeOf(pub('host1'))).toEqual(['FAILED_PRECONDITION', 'ATTACHED_TO_ANOTHER_HOST']);
    expect((await codeOf(pub('host9')))[0]).toBe('NOT_FOUND');
    expect(
      (await codeOf(ctl.controllerPublishVolume({ volumeId: `${domain.id}/${domain.id}`, nodeId: 'host1', volumeCapability: mount(), readonly: false })))[0],
    ).toBe('NOT_FOUND');
    expect(await codeOf(ctl.deleteVolume({ volumeId: v.volumeId }, call))).toEqual(['FAILED_PRECONDITION', 'DISK_PUBLISHED']);
    // Nor through the sdmesh API: a published disk is not moved or deleted under its host.
    const published = v.volumeId.split('/')[1]!;
    expect(await codeOf(sm.api.disks.deleteDisk({ requestId: 'csi-test-delete-published', storageDomainId: domain.id, diskId: published }))).toEqual([
      'FAILED_PRECONDITION',
      'DISK_PUBLISHED',
    ]);
    expect(
      await codeOf(
        sm.api.disks.moveDisk({ requestId: 'csi-test-move-published', storageDomainId: domain.id, diskId: published, targetStorageDomainId: domain.id }),
      ),
    ).toEqual(['FAILED_PRECONDITION', 'DISK_PUBLISHED']);
    expect(await codeOf(ctl.createSnapshot({ sourceVolumeId: v.volumeId, name: 'of-published', parameters: {} }, call))).toEqual([
      'FAILED_PRECONDITION',
      'DISK_PUBLISHED',
    ]);
    expect((await ctl.controllerGetVolume({ volumeId: v.volumeId })).status!.publishedNodeIds).toEqual(['host2']);
    const sdmctl = async (...argv: string[]) => {
      let out = '';
      const env = { SDMESH_ADDRESS: sm.replicas[0]!.grpcAddress, ...sm.mesh.tlsEnv({ kind: 'user', name: 'viewer' }) };
      const code = await runCli(argv, env, {
        out: { write: (t) => (out += t) },
        err: { write: () => undefined },
        tty: false,
        signal: new AbortController().signal,
      });
      return { code, out };
    };
    const diskId = v.volumeId.split('/')[1]!;
    const listed = await sdmctl('disks', 'attachments', '--host', 'host2', '-o', 'json');
    expect(listed.code).toBe(0);
    expect(JSON.parse(listed.out)).toEqual([expect.objectContaining({ diskId, host: 'host2', mode: 'ATTACHMENT_MODE_EXCLUSIVE' })]);
    const shown = await sdmctl('disks', 'get', '-d', domain.id, diskId);
    expect(shown.out).toMatch(/Published to \(attachments\):\n.*\n.*host2\s+exclusive/);
    // Online expand: the node grows the image as its lease holder; the controller leaves the disk alone.
    expect(await ctl.controllerExpandVolume({ volumeId: v.volumeId, capacityRange: { requiredBytes: 80 * MiB, limitBytes: 0 } }, call)).toEqual({
      capacityBytes: 80 * MiB,
      nodeExpansionRequired: true,
    });
    expect((await diskOf(v.volumeId)).capacityBytes).toBe(64 * MiB);

    // A record of the old format (keyed by the disk id alone, before version 2), as a scheduler of
    // an earlier release still running beside this one writes it: the replica upgraded the bucket
    // at its start (the marker is in), so its watch moves the record to the new key; its rules hold.
    const old = (await create('old-format')).volume!;
    const oldDisk = await diskOf(old.volumeId);
    nats = await connect(sm.mesh.nats.connectOptions('scheduler'));
    const bucket = await openKv(nats, 'sdmesh_attachments');
    const schedulerMetric = async (series: string) => {
      const line = (await sm.metrics(sm.replicas[0]!)).split('\n').find((l) => l.startsWith(series));
      return line === undefined ? undefined : Number(line.split(' ').at(-1));
    };
    await waitFor(
      'the replica upgraded the attachment records',
      async () => ((await schedulerMetric('sdmesh_scheduler_disk_attachment_upgrade_done')) === 1 ? true : undefined),
      30_000,
      50,
    );
    expect(JSON.parse((await bucket.get('format'))!.string())).toMatchObject({ version: 2 });
    await bucket.create(
      `disk.${oldDisk.id}`,
      JSON.stringify({
        domainId: domain.id,
        diskId: oldDisk.id,
        attachments: [{ host: 'host1', mode: 'exclusive', readonly: false, createMs: Date.now(), leafVolumeId: oldDisk.volumes[0]!.id, generation: 0 }],
      }),
    );
    await waitFor('the old record moved to its new key', async () => ((await bucket.get(`disk.${domain.id}.${oldDisk.id}`)) ? true : undefined), 30_000, 50);
    expect(await schedulerMetric('sdmesh_scheduler_disk_attachment_legacy_records_total{outcome="after_upgrade"')).toBe(1);
    expect((await ctl.controllerGetVolume({ volumeId: old.volumeId })).status!.publishedNodeIds).toEqual(['host1']);
    const onOld = (node: string) => ctl.controllerPublishVolume({ volumeId: old.volumeId, nodeId: node, volumeCapability: mount(), readonly: false }, call);
    expect(await codeOf(onOld('host2'))).toEqual(['FAILED_PRECONDITION', 'ATTACHED_TO_ANOTHER_HOST']);
    expect(await codeOf(ctl.deleteVolume({ volumeId: old.volumeId }, call))).toEqual(['FAILED_PRECONDITION', 'DISK_PUBLISHED']);
    await ctl.controllerUnpublishVolume({ volumeId: old.volumeId, nodeId: 'host1' }, call);
    expect((await ctl.controllerGetVolume({ volumeId: old.volumeId })).status!.publishedNodeIds).toEqual([]);
    expect(await bucket.get(`disk.${oldDisk.id}`).then((e) => e?.operation ?? 'none')).not.toBe('PUT');
    expect((await onOld('host2')).publishContext.access).toBe('exclusive');
    expect(JSON.parse((await bucket.get(`disk.${domain.id}.${oldDisk.id}`))!.string())).toMatchObject({ version: 2, attachments: [{ host: 'host2' }] });
    await ctl.controllerUnpublishVolume({ volumeId: old.volumeId, nodeId: 'host2' }, call);
    // A damaged record is refused with a clear error and left as it is.
    await bucket.put(`disk.${domain.id}.${oldDisk.id}`, '{"version":2,"attachments":"everyone"}');
    const damaged = await codeOf(onOld('host1'));
    expect(damaged).toEqual(['INTERNAL', 'ATTACHMENT_RECORD_INVALID']);
    expect((await bucket.get(`disk.${domain.id}.${oldDisk.id}`))!.string()).toBe('{"version":2,"attachments":"everyone"}');
    await bucket.delete(`disk.${domain.id}.${oldDisk.id}`);
    await ctl.deleteVolume({ volumeId: old.volumeId }, call);

    // Raw block shared by several writers (live migration): both nodes publish and stage it, each
    // node's storage daemon holding the leaf's lease shared; host2 writes a block.
    const rwxCap = block(Mode.MULTI_NODE_MULTI_WRITER);
    const rwx = (await create('rwx', { volumeCapabilities: [rwxCap] })).volume!;
    const rwxCtx: Record<string, Record<string, string>> = {};
    const device: Record<string, string> = {};
    for (const node of ['host1', 'host2']) {
      rwxCtx[node] = (
        await ctl.controllerPublishVolume({ volumeId: rwx.volumeId, nodeId: node, volumeCapability: rwxCap, readonly: false }, call)
      ).publishContext;
      expect(rwxCtx[node]!.access).toBe('shared');
      device[node] = await attachBlock(node, rwx.volumeId, rwxCap, rwxCtx[node]!);
    }
    expect(rwxCtx.host2!.generation).toBe(rwxCtx.host1!.generation);
    const fromHost2 = randomBytes(4096);
    writeBlock(device.host2!, 100, fromHost2);
    expect(readBlock(device.host1!, 100)).toEqual(fromHost2);

    // host2 dies (its sanlock daemon and services): its attachments hold until sanlock calls it dead.
    const generation = Number(ctx1.generation);
    await sm.killHost('host2');
    const hostState = async () => sm.api.hosts.getHost({ host: 'host2' });
    while ((await hostState()).healthy) await new Promise((r) => setTimeout(r, 300));
    expect(await codeOf(ctl.controllerUnpublishVolume({ volumeId: v.volumeId, nodeId: 'host2' }))).toEqual(['FAILED_PRECONDITION', 'HOST_NOT_DEAD']);
    expect(await codeOf(ctl.controllerUnpublishVolume({ volumeId: rwx.volumeId, nodeId: 'host2' }))).toEqual(['FAILED_PRECONDITION', 'HOST_NOT_DEAD']);
    expect(await codeOf(pub('host1'))).toEqual(['FAILED_PRECONDITION', 'ATTACHED_TO_ANOTHER_HOST']);
    while ((await hostState()).liveness[domain.id] !== pb.HostLiveness.HOST_LIVENESS_DEAD) await new Promise((r) => setTimeout(r, 1000));

    // The shared volume: host2's attachment goes while host1 keeps its own, at the same generation
    // (no bump: host1's storage daemon holds the lease, and its publish context stays valid), and host1 goes on writing.
    await ctl.controllerUnpublishVolume({ volumeId: rwx.volumeId, nodeId: 'host2' }, call);
    await ctl.controllerUnpublishVolume({ volumeId: rwx.volumeId, nodeId: 'host2' }, call);
    expect((await ctl.controllerGetVolume({ volumeId: rwx.volumeId })).status!.publishedNodeIds).toEqual(['host1']);
    const rwxLeaf = async () => (await diskOf(rwx.volumeId)).volumes[0]!.generation;
    expect(await rwxLeaf()).toBe(Number(rwxCtx.host1!.generation));
    expect(
      (await ctl.controllerPublishVolume({ volumeId: rwx.volumeId, nodeId: 'host1', volumeCapability: rwxCap, readonly: false }, call)).publishContext,
    ).toEqual(rwxCtx.host1);
    expect(readBlock(device.host1!, 100)).toEqual(fromHost2);
    const fromHost1 = randomBytes(4096);
    writeBlock(device.host1!, 200, fromHost1);
    expect(readBlock(device.host1!, 200)).toEqual(fromHost1);
    const host1Node = nodeClient('host1');
    const stats = await host1Node.nodeGetVolumeStats({
      volumeId: rwx.volumeId,
      volumePath: device.host1!,
      stagingTargetPath: staged.get(`host1/${rwx.volumeId}`)!.staging,
    });
    host1Node.close();
    expect(stats.volumeCondition).toEqual({ abnormal: false, message: 'healthy' });

    // The exclusive volume: unpublished from the dead host with the generation bumped.
    await ctl.controllerUnpublishVolume({ volumeId: v.volumeId, nodeId: 'host2' }, call);
    await ctl.controllerUnpublishVolume({ volumeId: v.volumeId, nodeId: 'host2' }, call);
    const ctx2 = (await pub('host1')).publishContext;
    expect(Number(ctx2.generation)).toBe(generation + 1);
    const fenced = sm.events.filter(
      ({ event }) => event.payload?.$case === 'diskAttachment' && event.payload.diskAttachment.kind === pb.DiskAttachmentEvent_Kind.KIND_FENCED,
    );
    expect(fenced.map(({ event }) => (event.payload?.$case === 'diskAttachment' ? event.payload.diskAttachment.diskId : ''))).toEqual([published]);

    // host1 lets the shared volume go; the bump owed since host2's attachment went is paid before
    // the next publish with no other host on it: a context host2 was given no longer stages.
    await detach(staged.get(`host1/${rwx.volumeId}`)!);
    await ctl.controllerUnpublishVolume({ volumeId: rwx.volumeId, nodeId: 'host1' }, call);
    expect((await ctl.controllerGetVolume({ volumeId: rwx.volumeId })).status!.publishedNodeIds).toEqual([]);
    const alone = await ctl.controllerPublishVolume({ volumeId: rwx.volumeId, nodeId: 'host1', volumeCapability: block(), readonly: false }, call);
    expect(Number(alone.publishContext.generation)).toBe(Number(rwxCtx.host1!.generation) + 1);
    expect(await rwxLeaf()).toBe(Number(rwxCtx.host1!.generation) + 1);
    await ctl.controllerUnpublishVolume({ volumeId: rwx.volumeId, nodeId: 'host1' }, call);
    // host2's node plugin (alive, its storage daemon killed with its sanlock) cleans up its side.
    await detach(staged.get(`host2/${rwx.volumeId}`)!);
  }, 300_000);
});
