#!/usr/bin/env node
import fs from 'node:fs';
import path from 'node:path';
import { checkHealth, loadConfigOrExit } from '@sdmesh/common';
import { runDemo, SDMCTL } from './demo';
import { LOCAL_USERS, LocalMesh } from './mesh';
import { REPO_ROOT } from './service-process';

const options = {
  dir: { type: 'string', description: 'Working directory (logs, sanlock run dirs, NATS store, storage/).', default: path.join(REPO_ROOT, '.sdmesh') },
  hosts: { type: 'int', description: 'Number of simulated hosts.', default: 3, min: 1, max: 16 },
  logLevel: { type: 'enum', description: 'Log level of the services.', choices: ['debug', 'info', 'warn', 'error'], default: 'info' },
  exitAfterStart: { type: 'bool', description: 'Stop the mesh right after it is up and checked (for tests).', default: false },
  demo: {
    type: 'bool',
    description: 'Once the mesh is up, run the demo through sdmctl (two domains, a disk, a snapshot, a move, checks); --demo=false to skip it.',
    default: true,
  },
} as const;

async function main(): Promise<void> {
  const config = loadConfigOrExit(
    'local',
    'Runs the whole sdmesh on this machine: nats-server, simulated hosts (sanlock + per-host services), a scheduler, a local directory as shared storage. Stays up until Ctrl-C.',
    options,
    process.argv.slice(2),
    process.env,
  );
  const dir = path.resolve(config.dir);
  const mesh = new LocalMesh({ dir, hosts: config.hosts, logLevel: config.logLevel });
  console.log(`sdmesh: starting the mesh in ${dir}`);
  await mesh.start((msg) => console.log(`  started ${msg}`));

  const rows: string[][] = [['SERVICE', 'HOST', 'GRPC', 'METRICS', 'HEALTH']];
  const credentials = mesh.credentials();
  for (const s of mesh.services()) {
    const health = await checkHealth(s.grpcAddress, credentials).catch((e: Error) => `ERROR ${e.message}`);
    rows.push([s.name, s.host, s.grpcAddress, `http://127.0.0.1:${s.metricsPort}/metrics`, health]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  console.log('');
  for (const r of rows) console.log(r.map((c, i) => c.padEnd(widths[i]!)).join('  '));
  console.log('');
  console.log(`nats: ${mesh.nats.url}   shared storage: ${mesh.storageDir}   logs: ${mesh.logDir}`);
  console.log('mesh is up');

  let stopping = false;
  const demoAbort = new AbortController();
  const stop = async (why: string) => {
    if (stopping) return;
    stopping = true;
    demoAbort.abort();
    console.log(`\nsdmesh: ${why}: stopping every process...`);
    await mesh.stop();
    console.log('sdmesh: stopped cleanly');
    process.exit(0);
  };
  if (config.exitAfterStart) return stop('--exit-after-start');
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGTERM', () => void stop('SIGTERM'));
  // For sdmctl in another terminal: `. <dir>/sdmctl.env`.
  fs.writeFileSync(
    path.join(dir, 'sdmctl.env'),
    `export SDMESH_ADDRESS=${mesh.scheduler?.grpcAddress ?? ''}\n${Object.entries({
      ...mesh.nats.clientEnv('sdmctl'),
      ...mesh.tlsEnv({ kind: 'user', name: LOCAL_USERS.admin }),
    })
      .map(([k, v]) => `export ${k}=${v ?? ''}\n`)
      .join('')}alias sdmctl="node ${SDMCTL}"\n`,
  );
  if (config.demo) {
    console.log('press Ctrl-C to stop (the demo runs now; --demo=false skips it)');
    await runDemo({ mesh, signal: demoAbort.signal });
    if (stopping) return;
    console.log(
      `\n(. ${path.join(dir, 'sdmctl.env')} sets SDMESH_ADDRESS, sdmctl's certificate (SDMESH_TLS_*, the admin user), its SDMESH_NATS_* credentials and the sdmctl alias)`,
    );
  }
  console.log('press Ctrl-C to stop');
}

main().catch((err: Error) => {
  console.error(`sdmesh-local: error: ${err.message}`);
  process.exit(1);
});
