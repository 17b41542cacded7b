import path from 'node:path';
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { ensureEventStream, EVENT_STREAM, openKv, pb } from '@sdmesh/common';
import { LocalMesh, NatsCluster, waitFor } from '@sdmesh/localmesh';
import { MiB, publicApi, type PublicApi } from '../harness/scheduler-mesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

const KV_STREAMS = ['operations', 'locks', 'domains', 'hosts'].map((b) => `KV_sdmesh_${b}`);
const STREAMS = [...KV_STREAMS, EVENT_STREAM];

/**
 * NATS is no single point of failure: a real 3-node nats-server cluster on loopback (TLS, a user
 * per workload, routes with mutual TLS and a password), the scheduler keeping 3 replicas of its
 * KV buckets and of the event stream, and every service given the three URLs. Operations run
 * through the scheduler the whole time while the nodes are SIGKILLed one at a time (each started
 * again and caught up before the next): every operation ends DONE, the KV still holds every
 * operation and disk, and every service reconnected.
 */
describe('a 3-node NATS cluster losing one node at a time under load', () => {
  const dir = makeTestDir('nats-cluster');
  const mesh = new LocalMesh({
    dir,
    hosts: 2,
    natsNodes: 3,
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', SDMESH_HOST_POLL_MS: '500' },
  });
  let api: PublicApi;
  let nc: NatsConnection;
  let jsm: JetStreamManager;

  beforeAll(async () => {
    await mesh.start();
    api = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
    nc = await connect({ ...mesh.nats.connectOptions('scheduler'), maxReconnectAttempts: -1, reconnectTimeWait: 250 });
    jsm = await jetstreamManager(nc);
    await waitFor(
      'two healthy hosts',
      async () => ((await api.hosts.listHosts({})).hosts.filter((h) => h.healthy).length === 2 ? true : undefined),
      60_000,
      300,
    );
  }, 120_000);
  afterAll(async () => {
    api?.close();
    await nc?.close();
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  /** Every stream has a leader and its other replicas are current (caught up). */
  const allCurrent = async () => {
    for (const name of STREAMS) {
      const info = await jsm.streams.info(name);
      if (!info.cluster?.leader || info.cluster.replicas?.length !== 2 || !info.cluster.replicas.every((r) => r.current && !r.offline)) return undefined;
    }
    return true;
  };

  const settled = async (name: string): Promise<pb.Operation> =>
    waitFor(
      `operation ${name} to end`,
      async () => {
        const op = await api.ops.getOperation({ name }, { timeoutMs: 5000 });
        return op.status === pb.OperationStatus.OPERATION_STATUS_RUNNING || op.status === pb.OperationStatus.OPERATION_STATUS_PENDING ? undefined : op;
      },
      90_000,
      250,
    );

  test('R3 buckets and stream; nodes SIGKILLed one at a time under load; nothing lost, every service reconnects', async () => {
    expect(mesh.nats).toBeInstanceOf(NatsCluster);
    const cluster = mesh.nats as NatsCluster;
    for (const name of STREAMS) expect((await jsm.streams.info(name)).config.num_replicas).toBe(3);

    const created = await api.domains.createStorageDomain({ requestId: 'nats-cluster-domain', name: 'gold', path: path.join(mesh.storageDir, 'gold') });
    const domain = await settled(created.name);
    expect(domain.status).toBe(pb.OperationStatus.OPERATION_STATUS_DONE);
    const domainId = domain.result?.$case === 'storageDomain' ? domain.result.storageDomain.id : '';

    // The load: disks created one after another through the scheduler, each call retried with
    // its request id (idempotent) while the scheduler can't reach a JetStream leader.
    const submitted: string[] = [];
    let loading = true;
    const load = (async () => {
      for (let i = 0; loading; i++) {
        const requestId = `load-${i}`;
        const op = await waitFor(
          `CreateDisk ${requestId} accepted`,
          () => api.disks.createDisk({ requestId, storageDomainId: domainId, capacityBytes: MiB, description: requestId }, { timeoutMs: 10_000 }),
          60_000,
          250,
        );
        submitted.push(op.name);
        await settled(op.name);
      }
    })();

    for (let node = 0; node < 3; node++) {
      const before = submitted.length;
      await cluster.killNode(node, 'SIGKILL');
      await waitFor(`operations running while nats-${node + 1} is down`, () => (submitted.length >= before + 2 ? true : undefined), 60_000, 200);
      await cluster.startNode(node);
      await waitFor(`nats-${node + 1} back and every stream caught up`, allCurrent, 60_000, 300);
    }
    loading = false;
    await load;

    // Every operation ended, and ended DONE: none was lost with a node.
    const ended = await Promise.all(submitted.map(settled));
    expect(ended.filter((op) => op.status !== pb.OperationStatus.OPERATION_STATUS_DONE).map((op) => pb.Operation.toJSON(op))).toEqual([]);
    expect(submitted.length).toBeGreaterThanOrEqual(6);
    // The KV still knows every disk those operations made.
    const disks = (await api.disks.listDisks({ storageDomainId: domainId })).disks;
    const diskIds = new Set(disks.map((d) => d.id));
    for (const op of ended) expect(op.result?.$case === 'disk' && diskIds.has(op.result.disk.id)).toBe(true);
    for (const name of STREAMS) expect((await jsm.streams.info(name)).config.num_replicas).toBe(3);
    // Every service lost its node at some point (each node was killed) and reconnected.
    for (const s of mesh.services()) {
      expect(s.process.running()).toBe(true);
      expect([s.host, s.name, s.lines.some((l) => l.includes('NATS reconnected'))]).toEqual([s.host, s.name, true]);
    }
  }, 240_000);

  test('an existing bucket or stream with another replica count is updated to the configured one', async () => {
    const replicasOf = async (stream: string) => (await jsm.streams.info(stream)).config.num_replicas;
    await openKv(nc, 'sdmesh_scratch', { replicas: 1 });
    expect(await replicasOf('KV_sdmesh_scratch')).toBe(1);
    await openKv(nc, 'sdmesh_scratch', { replicas: 3 });
    expect(await replicasOf('KV_sdmesh_scratch')).toBe(3);
    await ensureEventStream(nc, { replicas: 1 });
    expect(await replicasOf(EVENT_STREAM)).toBe(1);
    await ensureEventStream(nc, { replicas: 3 });
    expect(await replicasOf(EVENT_STREAM)).toBe(3);
  }, 60_000);
});
