import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, localLeaseManagerClient, MeshTls, pb, subscribeEvents, type ServiceClient } from '@sdmesh/common';
import { LocalPki, NatsServer, SanlockDaemon, startService, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from './paths';

export interface LeaseClusterHost {
  hostId: number;
  name: string;
  sanlock: SanlockDaemon;
  leaseManager: RunningService;
  /** `unix:<path>` of the host-local lease API. */
  leaseSocket: string;
  /** This test process as a local process of the host (on the unix socket). */
  client: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
  /** The scheduler's view: mTLS on the TCP port, as sdmesh://scheduler. */
  remote: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
}

/**
 * nats-server + N hosts, each a real sanlock daemon and a lease-manager process, plus an
 * event recorder. Tear down with stop().
 */
export class LeaseCluster {
  readonly dir = makeTestDir('leases');
  readonly pki = new LocalPki(path.join(this.dir, 'pki'));
  readonly nats = new NatsServer(path.join(this.dir, 'nats'), { pki: this.pki });
  readonly hosts: LeaseClusterHost[] = [];
  readonly events: { subject: string; event: pb.Event }[] = [];
  private watcher?: NatsConnection;

  async start(n: number, env: NodeJS.ProcessEnv = {}): Promise<this> {
    const names = Array.from({ length: n }, (_, i) => `lc${process.pid}-${i + 1}`);
    for (const name of names) this.nats.addUser(name, 'host');
    await this.nats.start();
    this.watcher = await connect(this.nats.connectOptions('sdmctl'));
    subscribeEvents(this.watcher, (event, subject) => this.events.push({ subject, event }));
    const daemons = await Promise.all(names.map((name) => new SanlockDaemon(name, path.join(this.dir, name)).start()));
    const schedulerTls = MeshTls.fromFiles(this.pki.forIdentity({ kind: 'scheduler' }));
    for (let i = 0; i < n; i++) {
      const socket = path.join(this.dir, names[i]!, 'run', 'lease-manager.sock');
      const leaseManager = await startService('lease-manager', {
        host: names[i]!,
        env: {
          ...daemons[i]!.env,
          ...LocalPki.env(this.pki.forIdentity({ kind: 'host', host: names[i]!, service: 'lease-manager' })),
          SDMESH_LEASE_SOCKET: socket,
          ...this.nats.clientEnv(names[i]!),
          SDMESH_HOST_ID: String(i + 1),
          SDMESH_IO_TIMEOUT: '1',
          SDMESH_LOG_LEVEL: 'debug',
          SDMESH_STATE_DIR: path.join(this.dir, names[i]!, 'state'),
          ...env,
        },
        logFile: path.join(this.dir, `${names[i]}-lease-manager.log`),
      });
      this.hosts.push({
        hostId: i + 1,
        name: names[i]!,
        sanlock: daemons[i]!,
        leaseManager,
        leaseSocket: `unix:${socket}`,
        client: localLeaseManagerClient(`unix:${socket}`),
        remote: createClient(pb.LeaseManagerServiceDefinition, leaseManager.grpcAddress, schedulerTls.channelCredentials()),
      });
    }
    return this;
  }

  host(id: number): LeaseClusterHost {
    return this.hosts[id - 1]!;
  }

  /** Formats a lockspace (ids) and `resources` leases (1 MiB apart) in dir/storage/<name>/dom_md/. */
  async formatDomain(lockspace: string, resources: string[]): Promise<{ ids: string; leases: string; location: (resource: string) => pb.LeaseLocation }> {
    const d = path.join(this.dir, 'storage', lockspace, 'dom_md');
    fs.mkdirSync(d, { recursive: true });
    const ids = path.join(d, 'ids');
    const leases = path.join(d, 'leases');
    const c = this.hosts[0]!.client;
    await c.formatLockspace({ lockspace, path: ids, ioTimeoutSeconds: 1 });
    const location = (resource: string) => ({ lockspace, resource, path: leases, offset: resources.indexOf(resource) * 1024 * 1024 });
    await c.formatLeases({ lockspace, path: leases, leases: resources.map(location) });
    return { ids, leases, location };
  }

  eventsOf<K extends NonNullable<pb.Event['payload']>['$case']>(kind: K): Extract<NonNullable<pb.Event['payload']>, { $case: K }>[] {
    return this.events.map((e) => e.event.payload).filter((p): p is Extract<NonNullable<pb.Event['payload']>, { $case: K }> => p?.$case === kind);
  }

  async stop(): Promise<void> {
    for (const h of this.hosts) {
      h.client.close();
      h.remote.close();
    }
    await Promise.all(this.hosts.map((h) => h.leaseManager.process.stop('SIGTERM', 5000)));
    await Promise.all(this.hosts.map((h) => h.sanlock.stop('SIGKILL')));
    await this.watcher?.close().catch(() => undefined);
    await this.nats.stop();
    removeTestDir(this.dir);
  }
}
