/**
 * The mesh as containers, the way the chart runs it: the image `make image` built, the chart's
 * rendered pods (NATS StatefulSet, scheduler Deployment, one DaemonSet pod per node with a
 * shared pid namespace holding sanlock and the per-host services) run by podman over one shared
 * storage directory, with the chart's env, volumes, users, capabilities, certificates and NATS
 * users (packages/localmesh/src/container-mesh.ts, chart-pods.ts; `make demo-containers` runs the
 * same module and demo). From outside the containers, through the public API
 * (sdmctl over the scheduler's published port with a user certificate): create domains, create
 * a disk, write data, move it, equal checksums. Then the chart's probes against the containers
 * (and a broken probe path that must fail), and the sanlock container of one host pod killed:
 * that pod's lease holders (metadata-tx, gc) die, the other host's do not. Everything is
 * removed at the end.
 *
 * Run by `make test-containers` (after `make image`), which .ci/run runs; not part of `make test`.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { ContainerMesh, podman, runContainersDemo, type ChartPods, type RunningPod } from '@sdmesh/localmesh';
import { REPO_ROOT } from '../../scripts/deploy-checks';

/* eslint-disable @typescript-eslint/no-explicit-any */
const NODES = ['node-a', 'node-b'];
const id = randomBytes(3).toString('hex');
// The same module as `make demo-containers` (packages/localmesh/src/container-mesh.ts).
const mesh = new ContainerMesh({ workDir: path.join(REPO_ROOT, '.sdmesh', `containers-${id}`), prefix: `sdmct-${id}-`, nodes: NODES, schedulers: 1 });
let chart: ChartPods;
let scheduler: RunningPod;
let hostPods: RunningPod[] = [];
let allPods: RunningPod[] = [];

beforeAll(async () => {
  await mesh.start();
  chart = mesh.chart;
  scheduler = mesh.schedulerPods[0]!;
  hostPods = mesh.hostPods;
  allPods = mesh.allPods;
}, 600_000);

afterAll(() => {
  const left = mesh.stop();
  expect(left).toEqual([]);
}, 180_000);

describe('the mesh as containers (chart pods, make image)', () => {
  it('every probe the chart declares passes against the running containers; a broken probe path fails', async () => {
    let count = 0;
    for (const pod of allPods)
      for (const p of chart.probes(pod)) {
        const r = await chart.probe(pod, p.container, p.spec);
        expect([pod.name, p.container, p.kind, r.ok, r.detail]).toEqual([pod.name, p.container, p.kind, true, r.detail]);
        count++;
      }
    expect(count).toBeGreaterThanOrEqual(15);
    const schedProbe = scheduler.spec.containers[0].readinessProbe;
    const broken = await chart.probe(scheduler, 'scheduler', { ...schedProbe, httpGet: { ...schedProbe.httpGet, path: '/healthz-not-there' } });
    expect(broken.ok).toBe(false);
    expect(broken.detail).toMatch(/HTTP 404/);
    const sanlockProbe = hostPods[0]!.spec.containers.find((c: any) => c.name === 'sanlock').readinessProbe;
    const brokenExec = await chart.probe(hostPods[0]!, 'sanlock', {
      exec: { command: [...sanlockProbe.exec.command.slice(0, -1), '/run/sanlock/not-there.sock'] },
    });
    expect(brokenExec.ok).toBe(false);
  });

  it('create domain, create disk, write data, move, equal checksums: through the public API from outside (the demo of make demo-containers)', async () => {
    const lines: string[] = [];
    const r = await runContainersDemo(mesh, { signal: new AbortController().signal, print: (l) => lines.push(l) });
    expect({ error: r.error, ok: r.ok, logs: r.ok ? '' : chart.logs(allPods, 10) }).toEqual({ error: undefined, ok: true, logs: '' });
    expect(r.checksumBefore).toMatch(/^[0-9a-f]{64}$/);
    expect(r.checksumAfter).toBe(r.checksumBefore);
    // The moved disk lives in the other domain on the shared storage, as the containers wrote it.
    expect(r.movedFile!.startsWith(path.join(mesh.storageDir, 'silver') + path.sep)).toBe(true);
    expect(lines).toContain(`hosts: ${NODES.join(', ')}`);
  }, 600_000);

  it("the image runs the CSI plugins and has the node plugin's tools", () => {
    const tools = [
      'sanlock',
      'qemu-storage-daemon',
      'qemu-nbd',
      'qemu-img',
      'losetup',
      'mount',
      'umount',
      'blkid',
      'findmnt',
      'blockdev',
      'mkfs.ext4',
      'resize2fs',
    ];
    const r = podman(
      ['run', '--rm', '--network', 'none', '--entrypoint', 'sh', mesh.built.image, '-c', `for t in ${tools.join(' ')}; do command -v $t; done`],
      {
        allowFail: true,
      },
    );
    expect(
      r.stdout
        .trim()
        .split('\n')
        .map((p) => path.basename(p)),
    ).toEqual(tools);
    // `sdmesh-run csi` starts the CSI driver: without a mode it refuses with its usage (exit 2).
    const csi = podman(['run', '--rm', '--network', 'none', mesh.built.image, 'csi'], { allowFail: true });
    expect([csi.status, csi.stderr]).toEqual([2, expect.stringMatching(/--mode/)]);
  });

  it("killing one host pod's sanlock container kills that host's lease holders, not the other host's", async () => {
    const [a, b] = hostPods as [RunningPod, RunningPod];
    // metadata-tx and gc registered with their pod's sanlock daemon at start-up.
    const status = podman(['exec', a.containerName('sanlock'), 'sanlock', 'client', 'status']).stdout;
    expect(status.split('\n').filter((l) => /^p \d+/.test(l)).length).toBeGreaterThanOrEqual(2);
    podman(['kill', '--signal', 'KILL', a.containerName('sanlock')]);
    const deadline = Date.now() + 60_000;
    const holders = ['metadata-tx', 'gc'];
    // podman shows a container whose process ended as "stopped" until its clean-up has run, then "exited".
    while (Date.now() < deadline && holders.some((c) => chart.state(a, c).status !== 'exited')) await new Promise((r) => setTimeout(r, 500));
    // Exit 137: SIGKILL, which each holder sends itself when its daemon hangs up (LeaseHolder).
    for (const c of holders) expect([c, chart.state(a, c)]).toEqual([c, { status: 'exited', exitCode: 137 }]);
    // The other host's holders and its daemon are untouched.
    for (const c of ['sanlock', ...holders]) expect([c, chart.state(b, c).status]).toEqual([c, 'running']);
  }, 120_000);
});
