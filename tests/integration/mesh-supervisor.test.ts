import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { LocalMesh, waitFor, type SupervisorEvent } from '@sdmesh/localmesh';
import { makeTestDir, pidAlive, removeTestDir, REPO_ROOT } from '../harness/paths';

const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const MiB = 1024 * 1024;

/**
 * The local mesh behaves like a deployment: two scheduler replicas, every service's command line
 * naming its host, and a supervisor that restarts a process that dies (same ports, with a
 * backoff). A host's data-mover and a scheduler replica are SIGKILLed: both come back, and
 * operations through sdmctl (given both replicas' addresses, the killed one first) still complete.
 */
describe('LocalMesh restarts what dies', () => {
  const dir = makeTestDir('supervisor');
  const events: SupervisorEvent[] = [];
  const mesh = new LocalMesh({
    dir,
    hosts: 2,
    schedulers: 2,
    restart: { initialBackoffMs: 200, maxBackoffMs: 2000 },
    onSupervisorEvent: (e) => events.push(e),
    // Copies at 4 MiB/s, so one is still running when its scheduler replica is killed.
    env: {
      SDMESH_IO_TIMEOUT: '1',
      SDMESH_EVENT_HEARTBEAT_MS: '0',
      SDMESH_HOST_POLL_MS: '500',
      SDMESH_TAKEOVER_MS: '2000',
      SDMESH_COPY_RATE_LIMIT: String(4 * 1024 * 1024),
    },
  });
  let env: NodeJS.ProcessEnv;

  const sdmctl = <T>(...args: string[]): Promise<T> =>
    new Promise((resolve, reject) =>
      execFile(process.execPath, [SDMCTL, ...args, '-o', 'json'], { env, timeout: 240_000 }, (err, out, stderr) =>
        err ? reject(new Error(`sdmctl ${args.join(' ')}: ${stderr || err.message}`)) : resolve(JSON.parse(out) as T),
      ),
    );

  beforeAll(async () => {
    await mesh.start();
    env = { ...process.env, SDMESH_ADDRESS: mesh.schedulerAddresses, ...mesh.nats.clientEnv('sdmctl'), ...mesh.tlsEnv({ kind: 'user', name: 'admin' }) };
    await waitFor(
      'two healthy hosts',
      async () => ((await sdmctl<Array<{ healthy?: boolean }>>('hosts', 'list')).filter((h) => h.healthy).length === 2 ? true : undefined),
      60_000,
      500,
    );
  }, 120_000);
  afterAll(async () => {
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  test('a SIGKILLed data-mover and scheduler replica are restarted on their ports; operations still complete', async () => {
    expect(mesh.schedulers).toHaveLength(2);
    expect(mesh.schedulerAddresses.split(',')).toHaveLength(2);
    // `ps` shows whose process it is: the host is on the command line.
    const dataMover = mesh.hosts[0]!.services['data-mover']!;
    expect(fs.readFileSync(`/proc/${dataMover.process.pid}/cmdline`, 'utf8').split('\0')).toEqual(expect.arrayContaining(['--host-name', 'host1']));

    const domain = await sdmctl<{ storageDomain: { id: string } }>(
      'domains',
      'create',
      '--name',
      'gold',
      '--path',
      path.join(mesh.storageDir, 'gold'),
      '--wait',
    );
    const scheduler = mesh.schedulers[0]!;
    const [oldMover, oldScheduler] = [dataMover.process.pid, scheduler.process.pid];
    process.kill(oldMover, 'SIGKILL');
    process.kill(oldScheduler, 'SIGKILL');

    // While scheduler-1 is dead or restarting, sdmctl's first address refuses: the second answers.
    const disk = await sdmctl<{ disk: { id: string } }>('disks', 'create', '--domain', 'gold', '--size', String(8 * MiB), '--wait');
    expect(disk.disk.id).toBeTruthy();

    await waitFor(
      'both processes restarted',
      () => (mesh.restarts.get('host1/data-mover') && mesh.restarts.get('scheduler-1/scheduler') ? true : undefined),
      30_000,
      100,
    );
    expect(pidAlive(oldMover)).toBe(false);
    const [newMover, newScheduler] = [mesh.hosts[0]!.services['data-mover']!, mesh.schedulers[0]!];
    expect(newMover.process.pid).not.toBe(oldMover);
    expect(newScheduler.process.pid).not.toBe(oldScheduler);
    expect([newMover.grpcAddress, newScheduler.grpcAddress]).toEqual([dataMover.grpcAddress, scheduler.grpcAddress]);
    expect(events.filter((e) => e.kind === 'died').map((e) => `${e.host}/${e.service}`)).toEqual(
      expect.arrayContaining(['host1/data-mover', 'scheduler-1/scheduler']),
    );

    // The restarted services serve: copies on both hosts (one of them the restarted data-mover's).
    for (let i = 0; i < 2; i++) {
      const copy = await sdmctl<{ status: string }>('disks', 'copy', '--domain', 'gold', disk.disk.id, '--to', 'gold', '--wait');
      expect(copy.status).toBe('OPERATION_STATUS_DONE');
    }
    expect(domain.storageDomain.id).toBeTruthy();
  }, 400_000);

  test('a scheduler replica SIGKILLed in the middle of a copy: its operation is taken over and completes', async () => {
    const disk = await sdmctl<{ disk: { id: string; volumes: Array<{ path: string }> } }>(
      'disks',
      'create',
      '--domain',
      'gold',
      '--size',
      String(32 * MiB),
      '--wait',
    );
    // Data to copy (a sparse empty disk would copy at once): 32 MiB at 4 MiB/s.
    fs.writeFileSync(disk.disk.volumes[0]!.path, crypto.randomBytes(32 * MiB));
    // sdmctl asks the first replica that answers: scheduler-1, which then owns the copy.
    const copy = await sdmctl<{ name: string }>('disks', 'copy', '--domain', 'gold', disk.disk.id, '--to', 'gold');
    const owner = mesh.schedulers[0]!;
    await waitFor(
      'the copy running',
      async () => ((await sdmctl<{ status: string }>('ops', 'get', copy.name)).status === 'OPERATION_STATUS_RUNNING' ? true : undefined),
      30_000,
      200,
    );
    process.kill(owner.process.pid, 'SIGKILL');
    const done = await waitFor(
      'the copy to end',
      async () => {
        const op = await sdmctl<{ status: string }>('ops', 'get', copy.name);
        return op.status === 'OPERATION_STATUS_RUNNING' || op.status === 'OPERATION_STATUS_PENDING' ? undefined : op;
      },
      120_000,
      500,
    );
    expect(done.status).toBe('OPERATION_STATUS_DONE');
    // Another replica (scheduler-2, or scheduler-1 restarted) resumed it: what `make demo` prints.
    const resumed = mesh.schedulers.flatMap((s) => s.lines).filter((l) => l.includes('"resuming operation"') && l.includes(copy.name));
    expect(resumed.length).toBeGreaterThanOrEqual(1);
  }, 180_000);
});
