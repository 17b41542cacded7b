/**
 * Lease acquire+release latency: through the lease-manager's gRPC API (what every sdmesh
 * service pays) next to sanlock itself in the same run — the addon called in-process (the
 * floor: sanlock's own cost) and sanlock's CLI (`sanlock client command -r … -c /bin/true`,
 * which also pays a process start).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as sanlock from '@sdmesh/sanlock';
import { createLogger, LeaseHolder, localLeaseManagerClient, pb } from '@sdmesh/common';
import { LocalPki, NatsServer, SanlockDaemon, startService } from '@sdmesh/localmesh';
import { measure, printTable, runBench } from './lib';

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 200);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-lease-'));
  const pki = new LocalPki(path.join(dir, 'pki'));
  const nats = await new NatsServer(path.join(dir, 'nats'), { hosts: ['bench'], pki }).start();
  const socket = path.join(dir, 'run', 'lease-manager.sock');
  const daemon = await new SanlockDaemon(`bench-${process.pid}`, path.join(dir, 'sanlock')).start();
  sanlock.setRunDir(daemon.runDir);
  const lm = await startService('lease-manager', {
    host: 'bench',
    env: {
      ...daemon.env,
      ...nats.clientEnv('bench'),
      ...LocalPki.env(pki.forIdentity({ kind: 'host', host: 'bench', service: 'lease-manager' })),
      SDMESH_LEASE_SOCKET: socket,
      SDMESH_HOST_ID: '1',
      SDMESH_LOG_LEVEL: 'warn',
    },
    logFile: path.join(dir, 'lease-manager.log'),
  });
  try {
    fs.mkdirSync(path.join(dir, 'dom_md'));
    const ids = path.join(dir, 'dom_md', 'ids');
    const leases = path.join(dir, 'dom_md', 'leases');
    const lmClient = localLeaseManagerClient(`unix:${socket}`);
    await lmClient.formatLockspace({ lockspace: 'bench', path: ids, ioTimeoutSeconds: 1 });
    const loc = (resource: string, slot: number): pb.LeaseLocation => ({ lockspace: 'bench', resource, path: leases, offset: slot * 1048576 });
    await lmClient.formatLeases({ lockspace: 'bench', path: leases, leases: [loc('grpc', 0), loc('addon', 1), loc('cli', 2)] });
    await lmClient.joinLockspace({ lockspace: 'bench', path: ids, wait: true }, { timeoutMs: 60000 });

    console.log(`lease acquire+release, exclusive, one host, ${n} sequential cycles each (${os.cpus().length} cores)\n`);
    // One registration per process: the in-process baseline first, then this process as a holder.
    const client = sanlock.registerProcess();
    const res = [{ name: 'addon', path: leases, offset: 1048576 }];
    const addonCase = await measure('sanlock library in-process', n, async () => {
      await client.acquire('bench', res);
      await client.release('bench', res);
    });
    await client.close();
    const holder = await LeaseHolder.register({
      leaseManagerAddress: `unix:${socket}`,
      log: createLogger('bench', 'warn'),
      onFence: (why) => console.error(why),
    });
    const grpcCase = await measure('sdmesh gRPC (lease-manager, unix socket)', n, async () => {
      await holder.acquire(loc('grpc', 0), 'exclusive', 'bench');
      await holder.release(loc('grpc', 0));
    });
    const cliN = Math.min(n, 50);
    const cliCase = await measure(
      'sanlock CLI (client command)',
      cliN,
      async () => {
        // The daemon releases asynchronously after the command exits: an immediate next acquire
        // can get EAGAIN, so retry as any CLI user would.
        for (let attempt = 0; ; attempt++) {
          try {
            execFileSync('sanlock', ['client', 'command', '-r', `bench:cli:${leases}:${2 * 1048576}`, '-c', '/bin/true'], {
              env: { ...process.env, ...daemon.env },
              stdio: 'ignore',
            });
            return;
          } catch (err) {
            if (attempt >= 20) throw err;
            await new Promise((r) => setTimeout(r, 2));
          }
        }
      },
      3,
    );
    printTable([addonCase, grpcCase, cliCase], 'sanlock library in-process');
    console.log(`\nthe gRPC path adds ${(grpcCase.p50 - addonCase.p50).toFixed(2)} ms at p50 over sanlock's own cost`);
    await holder.close();
    lmClient.close();
  } finally {
    await lm.process.stop();
    await daemon.stop();
    await nats.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBench(main);
