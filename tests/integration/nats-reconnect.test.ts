import { connect } from '@nats-io/transport-node';
import { pb, subscribeEvents } from '@sdmesh/common';
import { LocalPki, NatsServer, startService, waitFor, type RunningService } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

describe('services and a NATS outage', () => {
  const dir = makeTestDir('nats');
  const nats = new NatsServer(dir, { hosts: ['hostA', 'hostB'] });
  const services: RunningService[] = [];
  afterAll(async () => {
    await Promise.all(services.map((s) => s.process.stop('SIGKILL')));
    await nats.stop();
    removeTestDir(dir);
  });

  it('reconnect after the NATS server is killed and restarted, and events flow again', async () => {
    await nats.start();
    const env = (host: string, service: 'gc' | 'data-mover') => ({
      ...nats.clientEnv(host),
      ...LocalPki.env(nats.pki.forIdentity({ kind: 'host', host, service })),
      SDMESH_EVENT_HEARTBEAT_MS: '200',
    });
    services.push(
      await startService('gc', { host: 'hostA', env: env('hostA', 'gc') }),
      await startService('data-mover', { host: 'hostB', env: env('hostB', 'data-mover') }),
    );

    const seen = new Map<string, number>();
    const count = (e: pb.Event) => {
      if (e.payload?.$case === 'service' && e.payload.service.kind === pb.ServiceEvent_Kind.KIND_HEARTBEAT) {
        const key = `${e.sourceService}@${e.sourceHost}`;
        seen.set(key, (seen.get(key) ?? 0) + 1);
      }
    };
    const watch = async () => {
      const nc = await connect(nats.connectOptions('sdmctl'));
      subscribeEvents(nc, count, 'sdmesh.events.service.>');
      return nc;
    };
    let watcher = await watch();
    await waitFor('heartbeats from both services', () => (seen.get('gc@hostA') && seen.get('data-mover@hostB') ? true : undefined));

    await nats.stop('SIGKILL');
    await watcher.close().catch(() => undefined);
    await new Promise((r) => setTimeout(r, 1000));
    // The services stay up while NATS is gone.
    for (const s of services) expect(s.process.running()).toBe(true);

    await nats.start();
    seen.clear();
    watcher = await watch();
    await waitFor('heartbeats after the restart', () => (seen.get('gc@hostA') && seen.get('data-mover@hostB') ? true : undefined), 60_000);
    for (const s of services) {
      expect(s.lines.some((l) => l.includes('NATS reconnected'))).toBe(true);
    }
    await watcher.close();
  });
});
