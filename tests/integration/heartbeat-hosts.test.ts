import { createClient, pb } from '@sdmesh/common';
import { LocalMesh, startService, type RunningService } from '@sdmesh/localmesh';
import path from 'node:path';
import { operationDone } from '../harness/lifecycle';
import { codeOf, MiB, publicApi, type PublicApi } from '../harness/scheduler-mesh';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * A scheduler started WITHOUT SDMESH_HOSTS learns the hosts from the HostAgents of their
 * lease-managers (HostService.Heartbeat), places work on them, and a lease-manager that comes
 * up without lockspaces joins the registered domains from the heartbeat answer.
 */
describe('heartbeats: hosts announce themselves to the scheduler', () => {
  const dir = makeTestDir('heartbeat');
  const mesh = new LocalMesh({
    dir,
    hosts: 2,
    heartbeats: { intervalMs: 500 },
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0', SDMESH_HOST_POLL_MS: '500', SDMESH_HOST_FORGET_MS: '4000' },
  });
  let api: PublicApi;

  const waitFor = async <T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 40_000): Promise<T> => {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const v = await fn().catch(() => undefined);
      if (v !== undefined) return v;
      if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 300));
    }
  };
  // WaitOperation answers the operation as it is at its timeout too: only an ended one is final.
  const done = (p: Promise<pb.Operation>) => operationDone(api, p);

  beforeAll(async () => {
    await mesh.start();
    api = publicApi(mesh.scheduler!.grpcAddress, mesh.credentials());
  }, 120_000);
  afterAll(async () => {
    api?.close();
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  test('the scheduler knows no host from its environment, then both from heartbeats, with their advertised addresses', async () => {
    expect(mesh.scheduler!.lines.some((l) => l.includes('"scheduler started"') && l.includes('"hosts":[]'))).toBe(true);
    const hosts = await waitFor('two healthy hosts', async () => {
      const { hosts } = await api.hosts.listHosts({});
      return hosts.filter((h) => h.healthy).length === 2 ? hosts : undefined;
    });
    for (const h of hosts) {
      const local = mesh.hosts.find((x) => x.name === h.name)!;
      expect(h).toMatchObject({
        leaseManagerAddress: local.services['lease-manager']!.grpcAddress,
        metadataTxAddress: local.services['metadata-tx']!.grpcAddress,
        dataMoverAddress: local.services['data-mover']!.grpcAddress,
        gcAddress: local.services.gc!.grpcAddress,
      });
      expect(h.lastHeartbeatTime).toBeDefined();
    }
  });

  test('a domain and a disk are created through it; the hosts report the domain reachable', async () => {
    const op = await done(api.domains.createStorageDomain({ requestId: 'hb-domain', name: 'hb', path: path.join(mesh.storageDir, 'hb') }));
    const domain = op.result?.$case === 'storageDomain' ? op.result.storageDomain : undefined;
    expect(domain).toBeDefined();
    const disk = await done(api.disks.createDisk({ requestId: 'hb-disk', storageDomainId: domain!.id, capacityBytes: 16 * MiB }));
    expect(disk.steps[0]!.host).toMatch(/^host[12]$/);
    const got = await api.disks.getDisk({ storageDomainId: domain!.id, diskId: disk.result?.$case === 'disk' ? disk.result.disk.id : '' });
    expect(got.legality).toBe(pb.Legality.LEGALITY_LEGAL);
    await waitFor('both hosts announcing the domain', async () => {
      const { hosts } = await api.hosts.listHosts({});
      return hosts.every((h) => h.reachableDomains.includes(domain!.id) && h.hostIds[domain!.id] === Number(h.name.slice(4))) ? true : undefined;
    });
  });

  test('a lease-manager that restarts without lockspaces joins the registered domain from the heartbeat answer', async () => {
    const { storageDomains } = await api.domains.listStorageDomains({});
    const domainId = storageDomains[0]!.id;
    const host = mesh.hosts[1]!;
    const old = host.services['lease-manager']!;
    const client = createClient(pb.LeaseManagerServiceDefinition, old.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
    // Leave the lockspace so the restarted lease-manager really starts from nothing.
    await client.leaveLockspace({ lockspace: domainId, wait: true }, { timeoutMs: 30_000 });
    await old.process.stop('SIGTERM', 15_000);
    const lm: RunningService = await startService('lease-manager', {
      host: host.name,
      env: mesh.hostServiceEnv(host, 'lease-manager', {
        SDMESH_IO_TIMEOUT: '1',
        SDMESH_GRPC_PORT: String(old.grpcPort),
        SDMESH_SCHEDULER_ADDRESS: `127.0.0.1:1,${mesh.scheduler!.grpcAddress}`, // a dead replica first: tried in turn
        SDMESH_HEARTBEAT_INTERVAL_MS: '500',
        SDMESH_METADATA_TX_ADDRESS: host.services['metadata-tx']!.grpcAddress,
        SDMESH_DATA_MOVER_ADDRESS: host.services['data-mover']!.grpcAddress,
        SDMESH_GC_ADDRESS: host.services.gc!.grpcAddress,
      }),
      logFile: path.join(mesh.logDir, `${host.name}-lease-manager-2.log`),
    });
    host.services['lease-manager'] = lm;
    const joined = await waitFor('the lockspace joined again', async () => {
      const ls = await client.getLockspace({ lockspace: domainId }, { timeoutMs: 2000 });
      return ls.state === pb.LockspaceState.LOCKSPACE_STATE_JOINED ? ls : undefined;
    });
    expect(joined.hostId).toBe(host.hostId);
    expect(lm.lines.some((l) => l.includes('joining the lockspace of a domain the scheduler announced'))).toBe(true);
    client.close();
    // A heartbeat with a host id another host holds is refused (sent with the intruder's own host certificate).
    const intruder = createClient(
      pb.HostServiceDefinition,
      mesh.scheduler!.grpcAddress,
      mesh.credentials({ kind: 'host', host: 'intruder', service: 'lease-manager' }),
    );
    expect(
      await codeOf(
        intruder.heartbeat({
          host: {
            name: 'intruder',
            hostIds: { [domainId]: 1 },
            leaseManagerAddress: '127.0.0.1:1',
            metadataTxAddress: '127.0.0.1:1',
            dataMoverAddress: '127.0.0.1:1',
          },
        }),
      ),
    ).toEqual(['ALREADY_EXISTS', 'HOST_ID_IN_USE']);
    intruder.close();
  });

  test('a host that stops heartbeating and that sanlock calls free everywhere is forgotten, and its host id freed', async () => {
    const announce = (name: string) => {
      const client = createClient(
        pb.HostServiceDefinition,
        mesh.scheduler!.grpcAddress,
        mesh.credentials({ kind: 'host', host: name, service: 'lease-manager' }),
      );
      const host = { name, hostIds: { '': 9 }, leaseManagerAddress: '127.0.0.1:1', metadataTxAddress: '127.0.0.1:1', dataMoverAddress: '127.0.0.1:1' };
      return codeOf(client.heartbeat({ host })).finally(() => client.close());
    };
    // One heartbeat, then silence: a retired (or fake) host. Host id 9 never joined a lockspace.
    expect(await announce('ghost')).toEqual(['OK', '']);
    expect((await api.hosts.listHosts({})).hosts.map((h) => h.name)).toContain('ghost');
    expect(await announce('ghost2')).toEqual(['ALREADY_EXISTS', 'HOST_ID_IN_USE']);
    // SDMESH_HOST_FORGET_MS is 4 s in this mesh.
    await waitFor('ghost forgotten', async () => ((await api.hosts.listHosts({})).hosts.some((h) => h.name === 'ghost') ? undefined : true), 30_000);
    expect(mesh.scheduler!.lines.some((l) => l.includes('host forgotten') && l.includes('"ghost"'))).toBe(true);
    // The hosts that keep heartbeating stay, and id 9 can be given to a new host.
    expect(
      (await api.hosts.listHosts({})).hosts
        .filter((h) => h.healthy)
        .map((h) => h.name)
        .sort(),
    ).toEqual(['host1', 'host2']);
    expect(await announce('ghost2')).toEqual(['OK', '']);
  });
});
