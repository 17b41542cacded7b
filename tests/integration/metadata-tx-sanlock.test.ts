import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, findGarbage, GrpcStatus, pb, SdmeshError, subscribeEvents } from '@sdmesh/common';
import { LocalMesh, startService, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * metadata-tx with real domain leases: two hosts (sanlock daemon + lease-manager +
 * metadata-tx each) share one domain.
 */
describe('metadata-tx under real sanlock leases, 2 hosts', () => {
  const dir = makeTestDir('mdtx');
  // Each metadata-tx appends its domain lease holds here, timed inside the hold.
  const holdLog = path.join(dir, 'lease-holds.jsonl');
  const mesh = new LocalMesh({
    dir,
    hosts: 2,
    perHostServices: ['lease-manager', 'metadata-tx'],
    scheduler: false,
    logLevel: 'warn',
    env: { SDMESH_LEASE_HOLD_LOG: holdLog },
  });
  const extra: RunningService[] = [];
  const events: pb.Event[] = [];
  let watcher: NatsConnection;
  const domainId = randomUUID();
  const domainPath = path.join(dir, 'storage', 'dom1');
  const mdtx = (host: number) =>
    createClient(pb.MetadataTxServiceDefinition, mesh.hosts[host - 1]!.services['metadata-tx']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));

  beforeAll(async () => {
    await mesh.start();
    watcher = await connect(mesh.nats.connectOptions('sdmctl'));
    subscribeEvents(watcher, (e) => events.push(e));
    const domain = await mdtx(1).formatDomain({ domainId, name: 'dom1', path: domainPath, ioTimeoutSeconds: 1 }, { timeoutMs: 60000 });
    expect(domain.status).toBe(pb.DomainStatus.DOMAIN_STATUS_ACTIVE);
  });
  afterAll(async () => {
    await Promise.all(extra.map((s) => s.process.stop('SIGKILL')));
    await watcher?.close();
    await mesh.stop();
    removeTestDir(dir);
  });

  it('two hosts create 50 volumes each at the same time: all exist, distinct lease slots, the hosts take turns with the domain lease (group commit)', async () => {
    const create = (host: number, n: number) =>
      (async () => {
        const client = mdtx(host);
        const made: string[] = [];
        // 4 requests in flight per host: they queue on the domain lease and share its holds.
        const queue = Array.from({ length: n }, (_, i) => i);
        await Promise.all(
          Array.from({ length: 4 }, async () => {
            while (queue.length) {
              queue.shift();
              const v = await client.createVolume(
                {
                  domainPath,
                  imageId: randomUUID(),
                  volumeId: randomUUID(),
                  format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
                  allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
                  capacityBytes: 1 << 20,
                  description: `host ${host}`,
                },
                { timeoutMs: 120000 },
              );
              made.push(v.id);
            }
          }),
        );
        client.close();
        return made;
      })();
    const [a, b] = await Promise.all([create(1, 50), create(2, 50)]);
    expect(a).toHaveLength(50);
    expect(b).toHaveLength(50);
    const { volumes } = await mdtx(2).listVolumes({ domainPath });
    expect(volumes).toHaveLength(100);
    const slots = volumes.map((v) => v.lease!.offset);
    expect(new Set(slots).size).toBe(100);
    expect(new Set(volumes.map((v) => v.id))).toEqual(new Set([...a, ...b]));
    for (const v of volumes) expect(v.legality).toBe(pb.Legality.LEGALITY_LEGAL);

    // Serialized: the SDM lease holds of the two hosts never overlap, as each metadata-tx timed
    // them inside its holds. Each hold runs one or more creates (group commit).
    const holds = fs
      .readFileSync(holdLog, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { host: string; domainId: string; acquiredAt: number; releasedAt: number; transactions: number })
      .filter((h) => h.domainId === domainId);
    expect(holds.reduce((n, h) => n + h.transactions, 0)).toBeGreaterThanOrEqual(100);
    expect(holds.length).toBeLessThan(100);
    expect(new Set(holds.map((h) => h.host)).size).toBe(2);
    const overlapping = holds.filter((x, i) => holds.some((y, j) => j > i && x.host !== y.host && x.acquiredAt < y.releasedAt && y.acquiredAt < x.releasedAt));
    expect(overlapping).toEqual([]);
    // The lease-manager's events say the same, give or take their stamps (taken after each sanlock call returns).
    const sdm = events
      .filter((e) => e.payload?.$case === 'lease' && e.payload.lease.lease?.resource === 'SDM' && e.payload.lease.lease.lockspace === domainId)
      .map((e) => ({ host: e.sourceHost, kind: (e.payload as { lease: pb.LeaseEvent }).lease.kind, t: e.time!.getTime() }));
    const intervals: { host: string; from: number; to: number }[] = [];
    const open = new Map<string, number>();
    for (const e of sdm.sort((x, y) => x.t - y.t)) {
      if (e.kind === pb.LeaseEvent_Kind.KIND_ACQUIRED) open.set(e.host, e.t);
      if (e.kind === pb.LeaseEvent_Kind.KIND_RELEASED && open.has(e.host)) {
        intervals.push({ host: e.host, from: open.get(e.host)!, to: e.t });
        open.delete(e.host);
      }
    }
    expect(intervals.length).toBeGreaterThanOrEqual(2);
    expect(intervals.length).toBeLessThanOrEqual(100);
    expect(new Set(intervals.map((i) => i.host)).size).toBe(2);
  });

  it.each(['create.after-marker', 'create.after-data', 'create.before-commit'])(
    'kill -9 at %s: nothing partial is visible, the marker is left for the GC, the domain lease frees, a retry succeeds',
    async (faultPoint) => {
      const host = mesh.hosts[0]!;
      const faulty = await startService('metadata-tx', {
        host: host.name,
        env: mesh.hostServiceEnv(host, 'metadata-tx', { SDMESH_FAULT_POINT: faultPoint, SDMESH_LOG_LEVEL: 'warn' }),
      });
      extra.push(faulty);
      const request = { domainPath, imageId: randomUUID(), volumeId: randomUUID(), format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2, capacityBytes: 8 << 20 };
      const client = createClient(pb.MetadataTxServiceDefinition, faulty.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
      const err = await client.createVolume(request, { timeoutMs: 60000 }).then(
        () => undefined,
        (e: SdmeshError) => e,
      );
      client.close();
      expect(err?.code).toBe(GrpcStatus.UNAVAILABLE);
      expect(await faulty.process.exited).toBe('SIGKILL');

      const listed = await mdtx(2).listVolumes({ domainPath });
      expect(listed.volumes.some((v) => v.id === request.volumeId)).toBe(false);
      const garbage = await findGarbage(domainPath);
      expect(garbage.some((g) => g.relativePath.includes(request.imageId))).toBe(true);
      // The killed process held the domain lease; sanlock freed it, so host 2 goes on at once.
      const retried = await mdtx(2).createVolume(request, { timeoutMs: 30000 });
      expect(retried.id).toBe(request.volumeId);
      expect(fs.existsSync(retried.path)).toBe(true);
    },
  );

  it('kill -9 inside a group commit (before the second transaction of a hold): what committed is whole, the rest is not visible, the lease frees, retries succeed', async () => {
    const host = mesh.hosts[0]!;
    const faulty = await startService('metadata-tx', {
      host: host.name,
      env: mesh.hostServiceEnv(host, 'metadata-tx', { SDMESH_FAULT_POINT: 'group.next-transaction', SDMESH_LOG_LEVEL: 'warn' }),
    });
    extra.push(faulty);
    const requests = Array.from({ length: 4 }, () => ({
      domainPath,
      imageId: randomUUID(),
      volumeId: randomUUID(),
      format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
      capacityBytes: 8 << 20,
    }));
    const client = createClient(pb.MetadataTxServiceDefinition, faulty.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
    const outcomes = await Promise.allSettled(requests.map((r) => client.createVolume(r, { timeoutMs: 60000 })));
    client.close();
    expect(await faulty.process.exited).toBe('SIGKILL');
    // The first of the hold may have answered before the kill; the others never got an answer.
    expect(outcomes.filter((o) => o.status === 'rejected').length).toBeGreaterThanOrEqual(requests.length - 1);

    const listed = (await mdtx(2).listVolumes({ domainPath })).volumes.filter((v) => requests.some((r) => r.volumeId === v.id));
    expect(listed.length).toBeLessThan(requests.length);
    for (const v of listed) expect(fs.statSync(v.path).isFile()).toBe(true);
    // sanlock freed the killed process's hold: host 2 retries every request at once.
    const retried = await Promise.all(requests.map((r) => mdtx(2).createVolume(r, { timeoutMs: 60000 })));
    expect(retried.map((v) => v.id)).toEqual(requests.map((r) => r.volumeId));
    const all = (await mdtx(2).listVolumes({ domainPath })).volumes;
    expect(new Set(all.map((v) => v.lease!.offset)).size).toBe(all.length);
  });

  it('one metadata-tx process runs many transactions on one domain at once: they queue for the domain lease in-process', async () => {
    const client = mdtx(1);
    const made = await Promise.all(
      Array.from({ length: 8 }, () =>
        client.createVolume(
          { domainPath, imageId: randomUUID(), volumeId: randomUUID(), format: pb.VolumeFormat.VOLUME_FORMAT_RAW, capacityBytes: 1 << 20 },
          { timeoutMs: 60000 },
        ),
      ),
    );
    const updated = await Promise.all(
      made.map((v, i) =>
        client.updateVolume({ domainPath, imageId: v.imageId, volumeId: v.id, generation: v.generation, description: `burst ${i}` }, { timeoutMs: 60000 }),
      ),
    );
    expect(updated.map((v) => v.description)).toEqual(made.map((_, i) => `burst ${i}`));
    client.close();
  });

  it('a stale generation is refused and changes nothing', async () => {
    const v = await mdtx(1).createVolume({
      domainPath,
      imageId: randomUUID(),
      volumeId: randomUUID(),
      format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
      capacityBytes: 1 << 20,
    });
    const before = fs.readFileSync(v.path + '.meta');
    const err = await mdtx(2)
      .updateVolume({ domainPath, imageId: v.imageId, volumeId: v.id, generation: v.generation + 1, legality: pb.Legality.LEGALITY_ILLEGAL })
      .then(
        () => undefined,
        (e: SdmeshError) => e,
      );
    expect(err?.code).toBe(GrpcStatus.FAILED_PRECONDITION);
    expect(err?.reason).toBe('GENERATION_MISMATCH');
    expect(fs.readFileSync(v.path + '.meta')).toEqual(before);
  });
});
