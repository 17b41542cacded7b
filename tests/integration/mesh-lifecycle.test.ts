import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { checkHealth, MeshTls } from '@sdmesh/common';
import { LocalPki } from '@sdmesh/localmesh';
import { makeTestDir, pidAlive, removeTestDir, REPO_ROOT } from '../harness/paths';

function httpGet(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .on('error', reject);
  });
}

/** pids of every process whose environment or command line mentions dir. */
function processesUsing(dir: string): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid || !pidAlive(pid)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      const env = fs.readFileSync(`/proc/${pid}/environ`, 'utf8');
      if (cmd.includes(dir) || env.includes(dir)) out.push(pid);
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

describe("the launcher (the README's first command, without the demo)", () => {
  const dir = makeTestDir('launcher');
  afterAll(() => removeTestDir(dir));

  it('starts every process, each serves health and /metrics, and Ctrl-C leaves none behind', async () => {
    const child = spawn(process.execPath, [path.join(REPO_ROOT, 'packages/localmesh/dist/cli.js'), '--dir', dir, '--hosts', '3'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      const deadline = Date.now() + 90_000;
      while (!out.includes('mesh is up')) {
        if (child.exitCode !== null) throw new Error(`launcher exited early:\n${out}`);
        if (Date.now() > deadline) throw new Error(`launcher not up in time:\n${out}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      // Every row of the table: service, host, pid, grpc address, metrics URL, health.
      const rows = out
        .split('\n')
        .filter((l) => /^(lease-manager|metadata-tx|data-mover|gc|scheduler)\s/.test(l))
        .map((l) => l.trim().split(/\s+/));
      // 3 hosts of 4 services, 2 scheduler replicas.
      expect(rows).toHaveLength(3 * 4 + 2);
      expect(rows.filter((r) => r[0] === 'scheduler').map((r) => r[1])).toEqual(['scheduler-1', 'scheduler-2']);
      // Every gRPC port speaks mTLS: health is asked with the admin's certificate the launcher made.
      const admin = MeshTls.fromFiles(new LocalPki(path.join(dir, 'pki')).forIdentity({ kind: 'user', name: 'admin' })).channelCredentials();
      for (const [name, host, pid, grpcAddress, metricsUrl] of rows) {
        // The command line names the host (ps shows whose process it is).
        const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
        expect(argv.slice(argv.indexOf('--host-name'), argv.indexOf('--host-name') + 2)).toEqual(['--host-name', host]);
        expect(await checkHealth(grpcAddress!, admin)).toBe('SERVING');
        const metrics = await httpGet(metricsUrl!);
        expect(metrics.status).toBe(200);
        expect(metrics.body).toContain('process_cpu_seconds_total');
        expect(metrics.body).toContain(`sdmesh_service="${name}"`);
      }
      const before = processesUsing(dir);
      // nats-server, 3 sanlock daemons, 14 services.
      expect(before.length).toBeGreaterThanOrEqual(1 + 3 + 14);

      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(out).toContain('stopped cleanly');
      // The launcher waited for its children; a grandchild killed with them (a sanlock helper, a
      // qemu-nbd) may still be on its way out when it exits: allowed a bounded while, then
      // nothing that used the dir may be alive.
      for (const end = Date.now() + 15_000; Date.now() < end && (processesUsing(dir).length > 0 || before.some(pidAlive));) {
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(processesUsing(dir)).toEqual([]);
      for (const pid of before) expect(pidAlive(pid)).toBe(false);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});
