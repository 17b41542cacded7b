/**
 * The mesh as containers, the way the chart runs it: the image `make image` built, the chart's
 * rendered pods (NATS StatefulSet, scheduler Deployment, one DaemonSet pod per node with a
 * shared pid namespace holding sanlock and the per-host services) run by podman over one shared
 * storage directory, with the chart's env, volumes, users, capabilities, certificates and NATS
 * users (tests/harness/chart-pods.ts). From outside the containers, through the public API
 * (sdmctl over the scheduler's published port with a user certificate): create domains, create
 * a disk, write data, move it, equal checksums. Then the chart's probes against the containers
 * (and a broken probe path that must fail), and the sanlock container of one host pod killed:
 * that pod's lease holders (metadata-tx, gc) die, the other host's do not. Everything is
 * removed at the end.
 *
 * Run by `make test-containers` (after `make image`), which .ci/run runs; not part of `make test`.
 */
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { helmTemplate, REPO_ROOT } from '../../scripts/deploy-checks';
import { ChartPods, guestChecksum, imageExists, podman, type RunningPod } from '../harness/chart-pods';

/* eslint-disable @typescript-eslint/no-explicit-any */
const VERSION: string = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')).version;
const IMAGE = process.env.SDMESH_IMAGE_REF ?? `localhost/sdmesh:${VERSION}`;
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const IMAGE_VALUES = path.join(REPO_ROOT, 'dist', 'image', `sdmesh-${VERSION}.values.yaml`);
const DIGEST_FILE = path.join(REPO_ROOT, 'dist', 'image', `sdmesh-${VERSION}.digest`);
let DIGEST = '';
const NODES = ['node-a', 'node-b'];
const MOUNT = '/var/lib/sdmesh/storage';
const MiB = 1024 * 1024;

const id = randomBytes(3).toString('hex');
const prefix = `sdmct-${id}-`;
const workDir = path.join(REPO_ROOT, '.sdmesh', `containers-${id}`);
const storageDir = path.join(workDir, 'storage');

let mesh: ChartPods;
let scheduler: RunningPod;
const hostPods: RunningPod[] = [];
let allPods: RunningPod[] = [];
let userEnv: NodeJS.ProcessEnv = {};

function sdmctl<T = any>(args: string[], timeoutMs = 180_000): Promise<T> {
  return new Promise((resolve, reject) =>
    execFile(
      process.execPath,
      [SDMCTL, ...args, '-o', 'json'],
      { env: { ...process.env, ...userEnv }, timeout: timeoutMs, maxBuffer: 16 << 20 },
      (err, stdout, stderr) => {
        if (err) return reject(new Error(`sdmctl ${args.join(' ')}: ${stderr.trim() || err.message}\n${mesh.logs(allPods, 8)}`));
        try {
          resolve(JSON.parse(stdout) as T);
        } catch {
          reject(new Error(`sdmctl ${args.join(' ')} printed no JSON: ${stdout.slice(0, 300)}`));
        }
      },
    ),
  );
}

/** The shared storage as the host sees it, for a path the containers report. */
const onHost = (p: string) => path.join(storageDir, path.relative(MOUNT, p));

beforeAll(async () => {
  if (!imageExists(IMAGE) || !fs.existsSync(DIGEST_FILE))
    throw new Error(`${IMAGE} or ${DIGEST_FILE} is missing: run \`make image\` first (make test-containers does)`);
  DIGEST = fs.readFileSync(DIGEST_FILE, 'utf8').trim();
  fs.mkdirSync(storageDir, { recursive: true });
  const objects = helmTemplate({
    values: {
      // A test cluster without a watchdog device: unprivileged sanlock, io_timeout 1.
      sanlock: { privileged: false, watchdog: false, ioTimeout: 1 },
      storage: { type: 'hostPath', hostPath: { path: storageDir, type: 'Directory' } },
      hostIds: { source: 'map', nodeIds: { 'node-a': 1, 'node-b': 2 } },
      auth: { users: { dev: 'admin' } },
      host: { heartbeatIntervalMs: 1000 },
      // One NATS pod (the chart's default is a 3-node cluster; one is enough on 2 cores).
      nats: { replicas: 1 },
    },
    // The chart's image references as make image wrote them (the archive's digest).
    valuesFiles: [IMAGE_VALUES],
  });
  mesh = new ChartPods({
    prefix,
    workDir,
    objects,
    namespace: 'storage',
    images: (image) => {
      if (image === `sdmesh/sdmesh@${DIGEST}`) return { image: IMAGE };
      // The chart's NATS image is the upstream one; the sdmesh image carries Debian's nats-server.
      if (image.startsWith('nats:')) return { image: IMAGE, entrypoint: ['nats-server'] };
      throw new Error(`unexpected image ${image} in the rendered chart`);
    },
  });
  const user = mesh.pki.issue('sdmesh-tls-user-dev', ['URI:sdmesh://user/dev']);
  userEnv = { SDMESH_TLS_CA: user.ca, SDMESH_TLS_CERT: user.cert, SDMESH_TLS_KEY: user.key };
  mesh.createNetwork();
  const nats = mesh.workload('StatefulSet', 'sdmesh-nats');
  const natsPod = await mesh.runPod('sdmesh-nats-0', nats.spec.template, {
    serviceNames: ['sdmesh-nats.storage.svc', 'sdmesh-nats'],
    volumeClaims: nats.spec.volumeClaimTemplates,
  });
  await mesh.waitReady([natsPod], 60_000);
  // One scheduler replica (the chart asks for two; one is enough for this test on 2 cores).
  scheduler = await mesh.runPod('sdmesh-scheduler-0', mesh.workload('Deployment', 'sdmesh-scheduler').spec.template, {
    serviceNames: ['sdmesh-scheduler.storage.svc', 'sdmesh-scheduler'],
  });
  for (const node of NODES) hostPods.push(await mesh.runPod(`sdmesh-host-${node}`, mesh.workload('DaemonSet', `sdmesh-host-${node}`).spec.template, { node }));
  allPods = [natsPod, scheduler, ...hostPods];
  await mesh.waitReady(allPods, 240_000);
  userEnv.SDMESH_ADDRESS = `127.0.0.1:${scheduler.ports.get(7000)}`;
}, 600_000);

afterAll(() => {
  if (!mesh) return;
  const left = mesh.cleanup();
  fs.rmSync(workDir, { recursive: true, force: true });
  expect(left).toEqual([]);
}, 180_000);

describe('the mesh as containers (chart pods, make image)', () => {
  it('every probe the chart declares passes against the running containers; a broken probe path fails', async () => {
    let count = 0;
    for (const pod of allPods)
      for (const p of mesh.probes(pod)) {
        const r = await mesh.probe(pod, p.container, p.spec);
        expect([pod.name, p.container, p.kind, r.ok, r.detail]).toEqual([pod.name, p.container, p.kind, true, r.detail]);
        count++;
      }
    expect(count).toBeGreaterThanOrEqual(15);
    const schedProbe = scheduler.spec.containers[0].readinessProbe;
    const broken = await mesh.probe(scheduler, 'scheduler', { ...schedProbe, httpGet: { ...schedProbe.httpGet, path: '/healthz-not-there' } });
    expect(broken.ok).toBe(false);
    expect(broken.detail).toMatch(/HTTP 404/);
    const sanlockProbe = hostPods[0]!.spec.containers.find((c: any) => c.name === 'sanlock').readinessProbe;
    const brokenExec = await mesh.probe(hostPods[0]!, 'sanlock', {
      exec: { command: [...sanlockProbe.exec.command.slice(0, -1), '/run/sanlock/not-there.sock'] },
    });
    expect(brokenExec.ok).toBe(false);
  });

  it('create domain, create disk, write data, move, equal checksums: through the public API from outside', async () => {
    const deadline = Date.now() + 60_000;
    let hosts: any[] = [];
    while (Date.now() < deadline) {
      hosts = await sdmctl<any[]>(['hosts', 'list']);
      if (hosts.length >= NODES.length) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    expect(hosts.length).toBe(NODES.length);
    for (const name of ['gold', 'silver']) {
      fs.mkdirSync(path.join(storageDir, name), { recursive: true });
      await sdmctl(['domains', 'create', '--name', name, '--path', path.posix.join(MOUNT, name), '--wait']);
    }
    const created = await sdmctl(['disks', 'create', '--domain', 'gold', '--size', String(32 * MiB), '--description', 'containers test', '--wait']);
    const disk = created.disk;
    const file = onHost(disk.volumes[0].path);
    const fh = fs.openSync(file, 'r+');
    for (let i = 0; i < 4; i++) fs.writeSync(fh, randomBytes(2 * MiB), 0, 2 * MiB, i * 8 * MiB);
    fs.fsyncSync(fh);
    fs.closeSync(fh);
    const before = guestChecksum(file, 'raw', workDir);

    await sdmctl(['disks', 'move', '--domain', 'gold', disk.id, '--to', 'silver', '--wait'], 300_000);
    const moved = await sdmctl(['disks', 'get', '--domain', 'silver', disk.id]);
    const movedFile = onHost(moved.volumes.at(-1).path);
    expect(movedFile.startsWith(path.join(storageDir, 'silver'))).toBe(true);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output', 'json', movedFile], { encoding: 'utf8' }));
    expect(guestChecksum(movedFile, info.format, workDir)).toBe(before);
  }, 600_000);

  it("killing one host pod's sanlock container kills that host's lease holders, not the other host's", async () => {
    const [a, b] = hostPods as [RunningPod, RunningPod];
    // metadata-tx and gc registered with their pod's sanlock daemon at start-up.
    const status = podman(['exec', a.containerName('sanlock'), 'sanlock', 'client', 'status']).stdout;
    expect(status.split('\n').filter((l) => /^p \d+/.test(l)).length).toBeGreaterThanOrEqual(2);
    podman(['kill', '--signal', 'KILL', a.containerName('sanlock')]);
    const deadline = Date.now() + 60_000;
    const holders = ['metadata-tx', 'gc'];
    while (Date.now() < deadline && holders.some((c) => mesh.state(a, c).status === 'running')) await new Promise((r) => setTimeout(r, 500));
    // Exit 137: SIGKILL, which each holder sends itself when its daemon hangs up (LeaseHolder).
    for (const c of holders) expect([c, mesh.state(a, c)]).toEqual([c, { status: 'exited', exitCode: 137 }]);
    // The other host's holders and its daemon are untouched.
    for (const c of ['sanlock', ...holders]) expect([c, mesh.state(b, c).status]).toEqual([c, 'running']);
  }, 120_000);
});
