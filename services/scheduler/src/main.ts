#!/usr/bin/env node
import { randomUUID } from 'node:crypto';
import { ConfigError, ensureEventStream, MAX_NATS_REPLICAS, openKv, RolesFile, runService, storageRootsOption, StorageRoots } from '@sdmesh/common';
import { Cluster } from './cluster';
import { DomainRegistry, isActive } from './domains';
import { Engine } from './engine';
import { schedulerServices } from './handlers';
import { allocateHostId, releaseHostId } from './host-ids';
import { HostRegistry, parseHostsEnv, type Mode } from './hosts';
import { NatsKvStore } from './kv-store';
import { DiskAttachments } from './attachments';
import { LockManager } from './locks';
import { SchedulerMetrics } from './metrics';
import { OperationIndex } from './operation-index';
import { OperationRetention } from './operation-retention';
import { isTerminal, OperationStore } from './operation-store';
import { flowTable } from './operations';
import { retryPolicies, type FlowSettings } from './policies';
import { SpmElector } from './spm';

const DAY_MS = 86_400_000;

void runService({
  name: 'scheduler',
  summary: 'scheduler: the public sdmesh API (domains, disks, hosts, operations), engine locks and placement.',
  options: {
    mode: {
      type: 'enum',
      choices: ['sdm', 'spm'],
      default: 'sdm',
      description: 'sdm: every step on the least-loaded healthy host; spm: every step on the host holding the SPM lease of the master domain.',
    },
    hosts: {
      type: 'string',
      env: 'SDMESH_HOSTS',
      default: '',
      description:
        'JSON list of hosts [{name, hostId, leaseManager, metadataTx, dataMover, gc}] (hosts may also announce themselves with HostService.Heartbeat).',
    },
    hostPollMs: { type: 'int', default: 1000, min: 100, description: 'How often every host is polled for health and load.' },
    operationBeatMs: { type: 'int', default: 1000, min: 100, description: 'How often this replica refreshes its claim on the operations it runs.' },
    takeoverMs: {
      type: 'int',
      default: 10000,
      min: 500,
      description: 'An operation whose owner has not refreshed its claim for this long is taken over by this replica.',
    },
    placementWaitMs: { type: 'int', default: 120000, min: 0, description: 'How long a step waits for a host to run on (none healthy, no SPM elected yet).' },
    lockspaceLeaveMs: {
      type: 'int',
      default: 60000,
      min: 0,
      description:
        "How long deactivating or removing a domain, or a host's maintenance, keeps asking hosts that do not answer to leave the lockspace before it fails LEAVE_INCOMPLETE.",
    },
    fenceTimeoutMs: {
      type: 'int',
      default: 600000,
      min: 1000,
      description: "How long a copy waits for a dead host's lease on its destination to expire before the operation fails.",
    },
    domainIoTimeout: {
      type: 'int',
      env: 'SDMESH_IO_TIMEOUT',
      default: 10,
      min: 1,
      max: 60,
      description: 'sanlock io_timeout (seconds) of the lockspaces of new domains.',
    },
    copyRateLimit: { type: 'int', default: 0, min: 0, description: 'Rate limit of each copy job, bytes/s (0 = unlimited; for tests and benchmarks).' },
    hostHeartbeatTimeoutMs: {
      type: 'int',
      default: 15000,
      min: 1000,
      description: 'A host known only from Heartbeat calls is down after this long without one.',
    },
    hostForgetMs: {
      type: 'int',
      default: 3_600_000,
      min: 0,
      description:
        'A host known only from Heartbeat calls is forgotten (its host id freed) this long after its last one, once sanlock says it is dead in every domain (0 = never).',
    },
    rolesFile: {
      type: 'string',
      default: '',
      description:
        'JSON file {"users": {"<name>": "viewer|operator|admin"}} giving user certificates (sdmesh://user/<name>) their role; re-read when it changes. Empty: no user may call the public API.',
    },
    storageRoots: {
      ...storageRootsOption,
      description:
        'Comma-separated absolute directories of shared storage that CreateStorageDomain may put domains in (beneath one, never inside or above another domain); the hosts check again on the storage. Empty: CreateStorageDomain is refused (secure default).',
    },
    operationRetentionMs: {
      type: 'int',
      default: 7 * DAY_MS,
      min: 1000,
      max: 3650 * DAY_MS,
      description:
        'An ended operation (its steps, error and result) stays queryable this long after it ended; then it is purged (GetOperation: NOT_FOUND OPERATION_PURGED). Retries of its request_id are answered with it until then.',
    },
    requestIdRetentionMs: {
      type: 'int',
      default: 30 * DAY_MS,
      min: 1000,
      max: 3650 * DAY_MS,
      description:
        'How long after its end a purged operation still blocks its request_id (a retry fails REQUEST_ID_EXPIRED instead of running again); at least --operation-retention-ms. After this, the request_id is free.',
    },
    kvPrefix: { type: 'string', default: 'sdmesh', description: 'Prefix of the KV buckets (<prefix>_operations, _locks, _domains, _hosts, _attachments).' },
    natsReplicas: {
      type: 'int',
      default: 1,
      min: 1,
      max: MAX_NATS_REPLICAS,
      description:
        'Copies of the KV buckets and the event stream on a clustered NATS (JetStream replicas; 3 on a 3-node cluster, so no NATS node holds the only copy of the operation state). Applied on creation and to existing buckets and streams; at most the number of NATS nodes.',
    },
  },
  async start(ctx) {
    const { config, log, events } = ctx;
    if (config.requestIdRetentionMs < config.operationRetentionMs)
      throw new ConfigError(
        `--request-id-retention-ms (${config.requestIdRetentionMs}) must be at least --operation-retention-ms (${config.operationRetentionMs}): a request_id must not be free while its operation is kept`,
      );
    const storageRoots = new StorageRoots(config.storageRoots, 'the scheduler');
    if (!storageRoots.configured) log.warn('no --storage-roots (SDMESH_STORAGE_ROOTS): CreateStorageDomain is refused');
    const metrics = new SchedulerMetrics(ctx.metrics.registry);
    const nc = await ctx.nats;
    // Only schedulers may create streams (NATS permissions), so the event stream is made here.
    await ensureEventStream(nc, { replicas: config.natsReplicas }).catch((err) => log.warn({ err: String(err) }, 'could not ensure the event stream'));
    const kv = async (name: string) => new NatsKvStore(await openKv(nc, `${config.kvPrefix}_${name}`, { replicas: config.natsReplicas }));
    const [opsKv, locksKv, domainsKv, hostsKv, attachmentsKv] = await Promise.all([
      kv('operations'),
      kv('locks'),
      kv('domains'),
      kv('hosts'),
      kv('attachments'),
    ]);
    const instanceId = `${ctx.hostName}:${process.pid}:${randomUUID().slice(0, 8)}`;

    const domains = new DomainRegistry(domainsKv);
    domains.follow(log);
    const hosts = new HostRegistry({
      kv: hostsKv,
      log,
      events,
      metrics,
      pollMs: config.hostPollMs,
      domainIds: async () => (await domains.polled()).domains.filter(isActive).map((d) => d.id),
      leaveOrders: async () => (await domains.polled()).leaveOrders,
      mode: config.mode as Mode,
      heartbeatTimeoutMs: config.hostHeartbeatTimeoutMs,
      forgetAfterMs: config.hostForgetMs,
      releaseHostId: (name) => releaseHostId(hostsKv, name),
      tls: ctx.tls,
    });
    for (const spec of parseHostsEnv(config.hosts)) {
      hosts.add(spec);
      await allocateHostId(hostsKv, spec.name, spec.hostId).catch((err: unknown) => log.warn({ host: spec.name, err: String(err) }, 'host id claim failed'));
    }
    const cluster = new Cluster(hosts, domains, events, log);
    const store = new OperationStore(opsKv);
    const locks = new LockManager(locksKv, async (opId) => {
      const cur = await store.get(opId);
      return !cur || isTerminal(cur.rec.op.status);
    });
    const settings: FlowSettings = {
      placementWaitMs: config.placementWaitMs,
      fenceTimeoutMs: config.fenceTimeoutMs,
      lockspaceLeaveMs: config.lockspaceLeaveMs,
      domainIoTimeoutSeconds: config.domainIoTimeout,
      copyRateLimitBytesPerSecond: config.copyRateLimit,
    };
    const flows = flowTable({ cluster, settings, policies: retryPolicies(settings) });
    const index = new OperationIndex({ store, log, metrics });
    index.start();
    const retention = new OperationRetention({
      index,
      store,
      log,
      metrics,
      operationRetentionMs: config.operationRetentionMs,
      requestIdRetentionMs: config.requestIdRetentionMs,
    });
    retention.start();
    const engine = new Engine({
      store,
      locks,
      flows,
      log,
      events,
      metrics,
      instanceId,
      beatMs: config.operationBeatMs,
      takeoverMs: config.takeoverMs,
      ownerViews: () => index.summaries(),
    });
    hosts.start();
    const spm = config.mode === 'spm' ? new SpmElector({ hosts, domains, log, events, pollMs: config.hostPollMs }) : undefined;
    spm?.start();
    // Give the first host poll a moment so resumed operations find healthy hosts.
    setTimeout(() => engine.start(), Math.min(2000, config.hostPollMs * 2)).unref();
    log.info({ mode: config.mode, instanceId, hosts: [...hosts.hosts.keys()] }, 'scheduler started');
    // Moves attachment records of the old format to their new keys once, then follows the old keys (attachments.ts).
    const attachments = new DiskAttachments({ kv: attachmentsKv, cluster, events, log, metrics });
    void attachments.start();
    const roles = config.rolesFile ? new RolesFile(config.rolesFile) : undefined;
    if (!roles && !ctx.tls.insecure) log.warn('no --roles-file: user certificates have no role, so only hosts can call this scheduler');
    return {
      services: schedulerServices({
        engine,
        store,
        cluster,
        index,
        hostIdKv: hostsKv,
        storageRoots,
        attachments,
        roles,
      }),
      roles,
      stop: async () => {
        await engine.stop();
        attachments.stop();
        retention.stop();
        index.stop();
        domains.stopFollowing();
        spm?.stop();
        hosts.stop();
      },
    };
  },
});
