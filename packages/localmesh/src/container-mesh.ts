/**
 * The mesh as containers, the way the chart runs it: the image `make image` built and the
 * chart's rendered pods (the NATS StatefulSet's pod, the scheduler Deployment's replicas, one
 * DaemonSet pod per node with a shared pid namespace holding sanlock and the per-host services)
 * run by podman over one shared storage directory (chart-pods.ts), with the certificates a
 * cert-manager would issue for the chart's Certificates and the NATS users and passwords the
 * chart generates. Used by `make demo-containers` (containers-cli.ts) and by the containers
 * test (tests/containers/), which both run the demo below through the public API from outside
 * the containers.
 */
import fs from 'node:fs';
import path from 'node:path';
import { helmTemplate } from './chart';
import { ChartPods, guestChecksum, imageExists, type RunningPod } from './chart-pods';
import { DemoStopped, fillRandom, sdmctlRunner } from './demo';
import { REPO_ROOT } from './service-process';

/** storage.mountPath of the chart: where every container sees the shared storage. */
export const CONTAINER_STORAGE_MOUNT = '/var/lib/sdmesh/storage';
/** The chart's user (auth.users) whose certificate sdmctl uses from outside. */
export const CONTAINER_MESH_USER = 'dev';

/** What `make image` leaves for this version: the local image and the files beside the archive. */
export function builtImage(version: string = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')).version) {
  const dir = path.join(REPO_ROOT, 'dist', 'image');
  return {
    version,
    image: process.env.SDMESH_IMAGE_REF ?? `localhost/sdmesh:${version}`,
    archive: path.join(dir, `sdmesh-${version}.oci.tar`),
    digestFile: path.join(dir, `sdmesh-${version}.digest`),
    valuesFile: path.join(dir, `sdmesh-${version}.values.yaml`),
  };
}

export interface ContainerMeshOptions {
  /** Certificates, pod volumes, and the shared storage (`storage/`); removed by stop(). */
  workDir: string;
  /** Prefix of every podman object (pods, containers, network) this mesh creates. */
  prefix: string;
  /** Node names: one per-host pod each, host ids 1..n. */
  nodes: string[];
  /** Scheduler replicas (pods of the chart's Deployment). */
  schedulers: number;
  log?: (line: string) => void;
}

export class ContainerMesh {
  readonly storageDir: string;
  readonly built = builtImage();
  chart!: ChartPods;
  natsPod!: RunningPod;
  readonly schedulerPods: RunningPod[] = [];
  readonly hostPods: RunningPod[] = [];
  /** sdmctl's certificate files (the chart's user certificate). */
  userTls!: { ca: string; cert: string; key: string };

  constructor(readonly o: ContainerMeshOptions) {
    this.storageDir = path.join(o.workDir, 'storage');
  }

  get allPods(): RunningPod[] {
    return [this.natsPod, ...this.schedulerPods, ...this.hostPods].filter(Boolean);
  }

  /** The scheduler replicas' published gRPC ports, as sdmctl's --address takes them. */
  get schedulerAddress(): string {
    return this.schedulerPods.map((p) => `127.0.0.1:${p.ports.get(7000)}`).join(',');
  }

  /** The environment sdmctl needs to reach the mesh from the host as the chart's user. */
  sdmctlEnv(): Record<string, string> {
    return { SDMESH_ADDRESS: this.schedulerAddress, SDMESH_TLS_CA: this.userTls.ca, SDMESH_TLS_CERT: this.userTls.cert, SDMESH_TLS_KEY: this.userTls.key };
  }

  /** The host's path of a path the containers report under the storage mount. */
  onHost(p: string): string {
    return path.join(this.storageDir, path.relative(CONTAINER_STORAGE_MOUNT, p));
  }

  /** Renders the chart, then starts NATS, the schedulers and the per-host pods and waits for every probe. */
  async start(signal?: AbortSignal): Promise<void> {
    const log = this.o.log ?? (() => {});
    const { image, valuesFile, digestFile } = this.built;
    if (!imageExists(image) || !fs.existsSync(valuesFile) || !fs.existsSync(digestFile))
      throw new Error(`${image} or ${valuesFile} is missing: run \`make image\` first`);
    const digest = fs.readFileSync(digestFile, 'utf8').trim();
    fs.mkdirSync(this.storageDir, { recursive: true });
    const objects = helmTemplate({
      values: {
        // No watchdog device here: unprivileged sanlock, io_timeout 1 (a test cluster's values).
        sanlock: { privileged: false, watchdog: false, ioTimeout: 1 },
        storage: { type: 'hostPath', hostPath: { path: this.storageDir, type: 'Directory' } },
        hostIds: { source: 'map', nodeIds: Object.fromEntries(this.o.nodes.map((n, i) => [n, i + 1])) },
        auth: { users: { [CONTAINER_MESH_USER]: 'admin' } },
        host: { heartbeatIntervalMs: 1000 },
        scheduler: { replicas: Math.max(2, this.o.schedulers) },
        // One NATS pod (the chart's default is a 3-node cluster; one is enough on one machine).
        nats: { replicas: 1 },
      },
      // The chart's image references as make image wrote them (the archive's digest).
      valuesFiles: [valuesFile],
    });
    this.chart = new ChartPods({
      prefix: this.o.prefix,
      workDir: this.o.workDir,
      objects,
      namespace: 'storage',
      images: (ref) => {
        // Every container, NATS's included, runs the one image, by the digest make image wrote.
        if (ref.endsWith(`@${digest}`)) return { image };
        throw new Error(`unexpected image ${ref} in the rendered chart (make image's digest is ${digest})`);
      },
    });
    const user = this.chart.pki.issue(`sdmesh-tls-user-${CONTAINER_MESH_USER}`, [`URI:sdmesh://user/${CONTAINER_MESH_USER}`]);
    this.userTls = { ca: user.ca, cert: user.cert, key: user.key };
    const checkAborted = () => {
      if (signal?.aborted) throw new DemoStopped('interrupted');
    };

    this.chart.createNetwork();
    const nats = this.chart.workload('StatefulSet', 'sdmesh-nats');
    log('starting pod sdmesh-nats-0 (the NATS StatefulSet)');
    this.natsPod = await this.chart.runPod('sdmesh-nats-0', nats.spec.template, {
      serviceNames: ['sdmesh-nats.storage.svc', 'sdmesh-nats'],
      volumeClaims: nats.spec.volumeClaimTemplates,
    });
    await this.chart.waitReady([this.natsPod], 90_000, signal);
    const scheduler = this.chart.workload('Deployment', 'sdmesh-scheduler');
    for (let i = 0; i < this.o.schedulers; i++) {
      checkAborted();
      log(`starting pod sdmesh-scheduler-${i} (the scheduler Deployment)`);
      // The Service's names lead to the first replica (no kube-proxy here).
      const serviceNames = i === 0 ? ['sdmesh-scheduler.storage.svc', 'sdmesh-scheduler'] : [];
      this.schedulerPods.push(await this.chart.runPod(`sdmesh-scheduler-${i}`, scheduler.spec.template, { serviceNames }));
    }
    for (const node of this.o.nodes) {
      checkAborted();
      log(`starting pod sdmesh-host-${node} (the DaemonSet of ${node}: sanlock and the per-host services, one pid namespace)`);
      this.hostPods.push(await this.chart.runPod(`sdmesh-host-${node}`, this.chart.workload('DaemonSet', `sdmesh-host-${node}`).spec.template, { node }));
    }
    log('waiting for every probe the chart declares');
    await this.chart.waitReady(this.allPods, 300_000, signal);
  }

  /** Removes every pod, container and the network this mesh created, and its work directory; returns what could not be removed. */
  stop(): string[] {
    const left = this.chart ? this.chart.cleanup() : [];
    fs.rmSync(this.o.workDir, { recursive: true, force: true });
    return left;
  }
}

export interface ContainersDemoResult {
  ok: boolean;
  checksumBefore?: string;
  checksumAfter?: string;
  diskId?: string;
  /** The moved disk's top volume on the host, and its format. */
  movedFile?: string;
  movedFormat?: string;
  error?: string;
}

const MiB = 1024 * 1024;

/**
 * The demo against the mesh as containers, through the public API from outside (sdmctl on the
 * host with the chart user's certificate): the hosts announce themselves, two storage domains,
 * a disk, data written into it (on the shared storage, as a guest would), a move to the other
 * domain, and the guest-visible checksums before and after (qemu-img on the host).
 * `terminal` lets the move draw its progress bar; otherwise every command's answer is read.
 */
export async function runContainersDemo(
  mesh: ContainerMesh,
  opts: { signal: AbortSignal; print?: (line: string) => void; terminal?: boolean; diskBytes?: number; dataBytes?: number },
): Promise<ContainersDemoResult> {
  const print = opts.print ?? ((l: string) => console.log(l));
  const { shown, json } = sdmctlRunner({ ...process.env, ...mesh.sdmctlEnv(), SDMCTL_OUTPUT: '' }, opts.signal, print);
  const run = async (args: string[]) => {
    if (opts.terminal) {
      const code = await shown(args);
      if (code !== 0) throw new Error(`sdmctl ${args.slice(0, 2).join(' ')} failed (exit ${code}); the message is above`);
    } else {
      print(`$ sdmctl ${args.join(' ')}`);
      await json(args);
    }
  };
  const result: ContainersDemoResult = { ok: false };
  try {
    const deadline = Date.now() + 90_000;
    let hosts: Array<{ name: string }> = [];
    while ((hosts = await json<Array<{ name: string }>>(['hosts', 'list'])).length < mesh.o.nodes.length) {
      if (Date.now() > deadline) throw new Error(`only ${hosts.length} of ${mesh.o.nodes.length} hosts announced themselves within 90 s`);
      await new Promise((r) => setTimeout(r, 1000));
    }
    print(`hosts: ${hosts.map((h) => h.name).join(', ')}`);
    for (const name of ['gold', 'silver']) {
      // The domain directory on the shared storage, as a platform team would prepare it.
      fs.mkdirSync(path.join(mesh.storageDir, name), { recursive: true });
      await run(['domains', 'create', '--name', name, '--path', path.posix.join(CONTAINER_STORAGE_MOUNT, name), '--wait']);
    }
    const diskBytes = opts.diskBytes ?? 64 * MiB;
    const created = await json<{ disk: { id: string; volumes: Array<{ path: string }> } }>([
      'disks',
      'create',
      '--domain',
      'gold',
      '--size',
      String(diskBytes),
      '--description',
      'containers demo',
      '--wait',
    ]);
    const disk = created.disk;
    result.diskId = disk.id;
    const file = mesh.onHost(disk.volumes[0]!.path);
    print(`disk ${disk.id} (${diskBytes / MiB} MiB, raw) at ${disk.volumes[0]!.path} in the containers, ${file} on this machine`);
    const dataBytes = Math.min(opts.dataBytes ?? 16 * MiB, diskBytes);
    print(`writing ${dataBytes / MiB} MiB of random data into it`);
    await fillRandom(file, diskBytes, dataBytes);
    result.checksumBefore = guestChecksum(file, 'raw', mesh.o.workDir);
    print(`checksum before: sha256 ${result.checksumBefore}`);

    await run(['disks', 'move', '--domain', 'gold', disk.id, '--to', 'silver', '--wait']);
    const moved = await json<{ volumes: Array<{ path: string; format?: string }> }>(['disks', 'get', '--domain', 'silver', disk.id]);
    result.movedFile = mesh.onHost(moved.volumes.at(-1)!.path);
    // The format the mesh recorded, never probed from the guest-written bytes.
    result.movedFormat = /qcow2/i.test(moved.volumes.at(-1)!.format ?? '') ? 'qcow2' : 'raw';
    result.checksumAfter = guestChecksum(result.movedFile, result.movedFormat, mesh.o.workDir);
    print(`checksum after:  sha256 ${result.checksumAfter}  (${result.movedFile}, ${result.movedFormat})`);
    result.ok = result.checksumAfter === result.checksumBefore;
    print(result.ok ? 'checksums match: the disk moved intact' : 'CHECKSUMS DIFFER: the moved disk is not what was written');
  } catch (err) {
    result.error = opts.signal.aborted ? 'interrupted' : (err as Error).message;
    print(`demo stopped: ${result.error}`);
  }
  return result;
}
