#!/usr/bin/env node
import fs from 'node:fs';
import path from 'node:path';
import { checkHealth, loadConfigOrExit } from '@sdmesh/common';
import { runDemo, SDMCTL } from './demo';
import { LOCAL_USERS, LocalMesh, type SupervisorEvent } from './mesh';
import { REPO_ROOT } from './service-process';

const options = {
  dir: { type: 'string', description: 'Working directory (logs, sanlock run dirs, NATS store, storage/).', default: path.join(REPO_ROOT, '.sdmesh') },
  hosts: { type: 'int', description: 'Number of simulated hosts.', default: 3, min: 1, max: 16 },
  logLevel: { type: 'enum', description: 'Log level of the services.', choices: ['debug', 'info', 'warn', 'error'], default: 'info' },
  schedulers: { type: 'int', description: 'Scheduler replicas (each takes over the operations of one that dies).', default: 2, min: 1, max: 5 },
  natsNodes: {
    type: 'int',
    description: 'nats-server nodes: 1, or a JetStream cluster on loopback (3: every KV bucket and the event stream kept on all three).',
    default: 1,
    min: 1,
    max: 5,
  },
  restart: {
    type: 'bool',
    description: 'Restart a service process that dies, with a backoff, as Kubernetes would (--restart=false to leave it dead).',
    default: true,
  },
  csi: {
    type: 'bool',
    description: 'Also start the CSI driver: the controller and a node plugin per host, on unix sockets under <dir>/csi/ (issue 18).',
    default: false,
  },
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
  const mesh = new LocalMesh({
    dir,
    hosts: config.hosts,
    logLevel: config.logLevel,
    schedulers: config.schedulers,
    natsNodes: config.natsNodes,
    restart: config.restart,
    csi: config.csi,
    onSupervisorEvent: (e) => console.log(`\nsdmesh: ${describeSupervisorEvent(e)}`),
    onServiceLine: (service, host, line) => {
      const takeover = describeTakeover(service, host, line);
      if (takeover) console.log(`\nsdmesh: ${takeover}`);
    },
  });
  console.log(`sdmesh: starting the mesh in ${dir}`);
  await mesh.start((msg) => console.log(`  started ${msg}`));

  const rows: string[][] = [['SERVICE', 'HOST', 'PID', 'GRPC', 'METRICS', 'HEALTH']];
  const credentials = mesh.credentials();
  for (const s of mesh.services()) {
    const health = await checkHealth(s.grpcAddress, credentials).catch((e: Error) => `ERROR ${e.message}`);
    rows.push([s.name, s.host, String(s.process.pid), s.grpcAddress, `http://127.0.0.1:${s.metricsPort}/metrics`, health]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  console.log('');
  for (const r of rows) console.log(r.map((c, i) => c.padEnd(widths[i]!)).join('  '));
  console.log('');
  console.log(`nats: ${mesh.nats.url}   shared storage: ${mesh.storageDir}   logs: ${mesh.logDir}`);
  if (mesh.csiController) {
    console.log(`csi: controller ${mesh.csiController.endpoint} (pid ${mesh.csiController.process.pid})`);
    for (const h of mesh.hosts) if (h.csiNode) console.log(`csi: node ${h.name} ${h.csiNode.endpoint} (pid ${h.csiNode.process.pid})`);
  }
  if (config.restart)
    console.log(
      `a process that dies is restarted: try kill -KILL <a PID above> (a scheduler replica, a host's data-mover); \`pgrep -af -- '--host-name host2'\` lists a host's processes (of every mesh on this machine)`,
    );
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
    `export SDMESH_ADDRESS=${mesh.schedulerAddresses}\n${Object.entries({
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

function describeSupervisorEvent(e: SupervisorEvent): string {
  const who = `${e.service}@${e.host}`;
  switch (e.kind) {
    case 'died':
      return `${who} (pid ${e.pid}) died (${e.exit}); restarting it in ${e.delayMs} ms`;
    case 'restarted':
      return `${who} restarted (pid ${e.pid}, restart #${e.restarts})`;
    case 'restart-failed':
      return `${who} failed to restart: ${e.error}`;
  }
}

/** "scheduler-2 took over operation X from <replica>" from a scheduler's "resuming operation" log line. */
function describeTakeover(service: string, host: string, line: string): string | undefined {
  if (service !== 'scheduler' || !line.includes('"resuming operation"')) return undefined;
  try {
    const rec = JSON.parse(line) as { operation?: string; previousOwner?: string; step?: string };
    return `${host} took over operation ${rec.operation ?? '?'} from replica ${rec.previousOwner || '?'}${rec.step ? ` at step ${rec.step}` : ''}`;
  } catch {
    return undefined;
  }
}

main().catch((err: Error) => {
  console.error(`sdmesh-local: error: ${err.message}`);
  process.exit(1);
});
