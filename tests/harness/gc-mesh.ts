import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import {
  createClient,
  DomainLayout,
  listCommittedImageIds,
  listVolumeRecords,
  pb,
  subscribeEvents,
  type ServiceClient,
  type HostServiceName,
} from '@sdmesh/common';
import { LocalMesh, startService, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from './paths';

export type MetadataTxClient = ServiceClient<typeof pb.MetadataTxServiceDefinition>;
export type GcClient = ServiceClient<typeof pb.GcServiceDefinition>;

export interface RunningGc {
  service: RunningService;
  client: GcClient;
  host: string;
}

/**
 * A LocalMesh of N hosts (sanlock daemon + lease-manager + metadata-tx each, io_timeout 1 s,
 * no scheduler) plus an event recorder; gc processes are started per test with the options the
 * test needs, and metadata-tx processes armed with a fault point on demand.
 */
export class GcMesh {
  readonly dir = makeTestDir('gc');
  readonly mesh: LocalMesh;
  readonly events: { subject: string; event: pb.Event }[] = [];
  readonly mt: MetadataTxClient[] = [];
  private readonly extra: RunningService[] = [];
  private readonly clients: { close(): void }[] = [];
  private watcher?: NatsConnection;

  constructor(readonly hosts = 3) {
    this.mesh = new LocalMesh({
      dir: this.dir,
      hosts,
      scheduler: false,
      perHostServices: ['lease-manager', 'metadata-tx'],
      env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0' },
    });
  }

  async start(): Promise<this> {
    await this.mesh.start();
    this.watcher = await connect(this.mesh.nats.connectOptions('sdmctl'));
    subscribeEvents(this.watcher, (event, subject) => this.events.push({ subject, event }));
    for (const h of this.mesh.hosts) this.mt.push(this.client(pb.MetadataTxServiceDefinition, h.services['metadata-tx']!.grpcAddress));
    return this;
  }

  private client<D extends typeof pb.MetadataTxServiceDefinition | typeof pb.GcServiceDefinition>(def: D, address: string): ServiceClient<D> {
    const c = createClient(def, address, this.mesh.credentials({ kind: 'scheduler' }));
    this.clients.push(c);
    return c;
  }

  private hostEnv(i: number, service: HostServiceName): NodeJS.ProcessEnv {
    return this.mesh.hostServiceEnv(this.mesh.hosts[i]!, service, { SDMESH_LOG_LEVEL: 'info', SDMESH_EVENT_HEARTBEAT_MS: '0' });
  }

  /** Formats a domain at storage/<group>/<name> (io_timeout 1 s). */
  async formatDomain(group: string, maxVolumes = 400): Promise<{ id: string; path: string }> {
    const root = path.join(this.mesh.storageDir, group, `dom-${randomUUID().slice(0, 8)}`);
    fs.mkdirSync(path.dirname(root), { recursive: true });
    const id = randomUUID();
    await this.mt[0]!.formatDomain({ domainId: id, name: group, path: root, maxVolumes, ioTimeoutSeconds: 1 }, { timeoutMs: 60000 });
    return { id, path: root };
  }

  /** Starts a gc on host i (0-based). env overrides e.g. SDMESH_INTERVAL_MS, SDMESH_FAULT_POINT. */
  async startGc(i: number, env: NodeJS.ProcessEnv): Promise<RunningGc> {
    const host = this.mesh.hosts[i]!.name;
    const service = await startService('gc', {
      host,
      env: { ...this.hostEnv(i, 'gc'), SDMESH_GRACE_MS: '0', SDMESH_INTERVAL_MS: '0', ...env },
      logFile: path.join(this.mesh.logDir, `${host}-gc-${this.extra.length}.log`),
    });
    this.extra.push(service);
    return { service, client: this.client(pb.GcServiceDefinition, service.grpcAddress), host };
  }

  /** Starts a metadata-tx on host i that SIGKILLs itself at the fault point. */
  async startFaultyMetadataTx(i: number, faultPoint: string): Promise<{ service: RunningService; client: MetadataTxClient }> {
    const host = this.mesh.hosts[i]!.name;
    const service = await startService('metadata-tx', {
      host,
      env: { ...this.hostEnv(i, 'metadata-tx'), SDMESH_FAULT_POINT: faultPoint },
      logFile: path.join(this.mesh.logDir, `${host}-metadata-tx-fault.log`),
    });
    this.extra.push(service);
    return { service, client: this.client(pb.MetadataTxServiceDefinition, service.grpcAddress) };
  }

  gcEvents(domainId: string): { host: string; gc: pb.GcEvent }[] {
    return this.events.flatMap(({ event }) =>
      event.payload?.$case === 'gc' && event.payload.gc.domainId === domainId ? [{ host: event.sourceHost, gc: event.payload.gc }] : [],
    );
  }

  async stop(): Promise<void> {
    for (const c of this.clients) c.close();
    await Promise.all(this.extra.map((s) => s.process.stop('SIGKILL', 5000)));
    await this.watcher?.close().catch(() => undefined);
    await this.mesh.stop();
    removeTestDir(this.dir);
  }
}

/** Committed volume id → lease slot, read straight from the storage. */
export async function committedVolumes(root: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const imageId of await listCommittedImageIds(root)) {
    const listing = await listVolumeRecords(new DomainLayout(root).imageDir(imageId), { imageId });
    for (const r of listing.records) out.set(r.volumeId, r.leaseSlot);
  }
  return out;
}
