#!/usr/bin/env node
/**
 * `make demo-containers`: the mesh as containers, the way the chart runs it (container-mesh.ts),
 * with the demo through the public API from outside; then it stays up for sdmctl until Ctrl-C,
 * which removes every pod, container and network it created and its work directory.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { loadConfigOrExit } from '@sdmesh/common';
import { imageExists } from './chart-pods';
import { builtImage, CONTAINER_MESH_USER, ContainerMesh, runContainersDemo } from './container-mesh';
import { SDMCTL } from './demo';
import { REPO_ROOT } from './service-process';

const options = {
  dir: {
    type: 'string',
    description: 'Working directory (certificates, pod volumes, the shared storage); removed at the end.',
    default: path.join(REPO_ROOT, '.sdmesh', 'containers-demo'),
  },
  nodes: { type: 'int', description: 'Simulated nodes: one per-host pod each (sanlock and the per-host services).', default: 2, min: 1, max: 8 },
  schedulers: { type: 'int', description: 'Scheduler replicas (pods of the chart Deployment).', default: 2, min: 1, max: 3 },
  demo: { type: 'bool', description: 'Run the demo once the mesh is up (--demo=false to skip it).', default: true },
  exitAfterDemo: { type: 'bool', description: 'Stop and remove everything right after the demo (for checks).', default: false },
} as const;

async function main(): Promise<void> {
  const config = loadConfigOrExit(
    'demo-containers',
    "Runs the mesh as containers from the image make image builds and the Helm chart's rendered pods (NATS, schedulers, one pod per node), runs the demo through the public API, and stays up until Ctrl-C, which removes every pod, container and network it created.",
    options,
    process.argv.slice(2),
    process.env,
  );
  const built = builtImage();
  if (!imageExists(built.image) || !fs.existsSync(built.valuesFile)) {
    console.log(`demo-containers: ${built.image} is not built yet: make image (a few minutes the first time)`);
    const r = spawnSync('bash', [path.join(REPO_ROOT, 'scripts', 'image.sh')], { stdio: 'inherit', cwd: REPO_ROOT });
    if (r.status !== 0) throw new Error(`make image failed (exit ${r.status ?? r.signal})`);
  } else {
    console.log(`demo-containers: image ${built.image} (${fs.readFileSync(built.digestFile, 'utf8').trim()}); \`make image\` rebuilds it from this tree`);
  }
  const dir = path.resolve(config.dir);
  if (fs.existsSync(dir)) throw new Error(`${dir} exists: another demo-containers is running there, or one was killed (remove it, or give --dir)`);
  const prefix = `sdmdemo-${randomBytes(3).toString('hex')}-`;
  const mesh = new ContainerMesh({
    workDir: dir,
    prefix,
    nodes: Array.from({ length: config.nodes }, (_, i) => `node-${String.fromCharCode(97 + i)}`),
    schedulers: config.schedulers,
    log: (l) => console.log(`  ${l}`),
  });

  const abort = new AbortController();
  let stopping = false;
  const stop = (why: string, code: number) => {
    if (stopping) return;
    stopping = true;
    abort.abort();
    console.log(`\ndemo-containers: ${why}: removing the pods, containers and network ${prefix}*...`);
    const left = mesh.stop();
    if (left.length) console.log(`demo-containers: could not remove: ${left.join(', ')}`);
    else console.log(`demo-containers: removed everything it created (podman objects ${prefix}*, ${dir})`);
    process.exit(left.length ? 1 : code);
  };
  process.on('SIGINT', () => stop('SIGINT', 0));
  process.on('SIGTERM', () => stop('SIGTERM', 0));
  // Nothing else keeps this process alive while the containers run: it must stay until a signal.
  setInterval(() => {}, 3_600_000);
  try {
    await runMesh(mesh, config, abort.signal, () => stopping, stop);
  } catch (err) {
    // Whatever failed, the pods this run created go.
    console.error(`demo-containers: error: ${(err as Error).message}`);
    stop('error', 1);
  }
}

async function runMesh(
  mesh: ContainerMesh,
  config: { demo: boolean; exitAfterDemo: boolean },
  signal: AbortSignal,
  stopping: () => boolean,
  stop: (why: string, code: number) => void,
): Promise<void> {
  const { prefix, workDir: dir } = mesh.o;

  console.log(`demo-containers: the chart's pods as podman pods (names ${prefix}*), shared storage ${mesh.storageDir}`);
  try {
    await mesh.start(signal);
  } catch (err) {
    if (!stopping()) {
      console.error(`demo-containers: the mesh did not start: ${(err as Error).message}`);
      stop('start failed', 1);
    }
    return;
  }
  console.log('');
  for (const pod of mesh.allPods) {
    const ports = [...pod.ports].map(([c, h]) => `${c}->127.0.0.1:${h}`).join(' ');
    console.log(`pod ${pod.podmanPod}  ${pod.spec.containers.map((c: { name: string }) => c.name).join(',')}  ${ports}`);
  }
  console.log('mesh is up: every probe the chart declares passes');

  if (config.demo) {
    const result = await runContainersDemo(mesh, { signal, terminal: true });
    if (stopping()) return;
    console.log(result.ok ? '\ndemo finished' : `\ndemo FAILED${result.error ? `: ${result.error}` : ''}; the mesh stays up for a look`);
    if (config.exitAfterDemo) return stop('--exit-after-demo', result.ok ? 0 : 1);
  }

  const env = mesh.sdmctlEnv();
  const envFile = path.join(dir, 'sdmctl.env');
  fs.writeFileSync(
    envFile,
    `${Object.entries(env)
      .map(([k, v]) => `export ${k}=${v}\n`)
      .join('')}alias sdmctl="node ${SDMCTL}"\n`,
  );
  const firstHost = mesh.hostPods[0]!;
  console.log(
    [
      '',
      `sdmctl from this machine, as the chart's user "${CONTAINER_MESH_USER}" (role admin; certificate issued like cert-manager would for Secret sdmesh-tls-user-${CONTAINER_MESH_USER}):`,
      `  . ${envFile}     # or:`,
      `  export SDMESH_ADDRESS=${env.SDMESH_ADDRESS}`,
      `  export SDMESH_TLS_CA=${env.SDMESH_TLS_CA} SDMESH_TLS_CERT=${env.SDMESH_TLS_CERT} SDMESH_TLS_KEY=${env.SDMESH_TLS_KEY}`,
      `  alias sdmctl="node ${SDMCTL}"`,
      '  sdmctl hosts list',
      '  sdmctl domains list',
      '  sdmctl ops list',
      `  sdmctl disks list --domain silver`,
      'The containers:',
      `  podman pod ps --filter name=${prefix}`,
      `  podman logs -f ${firstHost.containerName('data-mover')}`,
      `  podman exec ${firstHost.containerName('sanlock')} sanlock client status`,
      `Shared storage (every domain): ${mesh.storageDir}`,
      'Ctrl-C removes every pod, container and network above, and this directory.',
    ].join('\n'),
  );
}

main().catch((err: Error) => {
  console.error(`demo-containers: error: ${err.message}`);
  process.exit(1);
});
