import fs from 'node:fs';
import path from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { createClient, pb, subscribeEvents, type ServiceClient } from '@sdmesh/common';
import { NatsServer, SanlockDaemon, startService, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from './paths';

export interface LeaseClusterHost {
  hostId: number;
  name: string;
  sanlock: SanlockDaemon;
  leaseManager: RunningService;
  client: ServiceClient<typeof pb.LeaseManagerServiceDefinition>;
}

/**
 * nats-server + N hosts, each a real sanlock daemon and a lease-manager process, plus an
 * event recorder. Tear down with stop().
 */
export class LeaseCluster {
  readonly dir = makeTestDir('leases');
  readonly nats = new NatsServer(path.join(this.dir, 'nats'));
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
    for (let i = 0; i < n; i++) {
      const leaseManager = await startService('lease-manager', {
        host: names[i]!,
        env: {
          ...daemons[i]!.env,
          ...this.nats.clientEnv(names[i]!),
          SDMESH_TLS_CA: this.nats.caFile,
          SDMESH_HOST_ID: String(i + 1),
          SDMESH_IO_TIMEOUT: '1',
          SDMESH_LOG_LEVEL: 'debug',
          SDMESH_STATE_DIR: path.join(this.dir, names[i]!, 'state'),
          ...env,
        },
        logFile: path.join(this.dir, `${names[i]}-lease-manager.log`),
      });
      this.hosts.push({ hostId: i + 1, name: names[i]!, sanlock: daemons[i]!, leaseManager, client: createClient(pb.LeaseManagerServiceDefinition, leaseManager.grpcAddress) });
    }
    return this;
  }

  host(id: number): LeaseClusterHost {
    return this.hosts[id - 1]!;
  }

  /** Formats a lockspace (ids) and `resources` leases (1 MiB apart) in dir/<name>/. */
  async formatDomain(lockspace: string, resources: string[]): Promise<{ ids: string; leases: string; location: (resource: string) => pb.LeaseLocation }> {
    const d = path.join(this.dir, 'storage', lockspace);
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
    for (const h of this.hosts) h.client.close();
    await Promise.all(this.hosts.map((h) => h.leaseManager.process.stop('SIGTERM', 5000)));
    await Promise.all(this.hosts.map((h) => h.sanlock.stop('SIGKILL')));
    await this.watcher?.close().catch(() => undefined);
    await this.nats.stop();
    removeTestDir(this.dir);
  }
}
