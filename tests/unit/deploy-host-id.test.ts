import { execFile } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT } from '../../scripts/deploy-checks';

// The per-host pod's init step (deploy/docker/host-id.js), against files and a fake API server.
const SCRIPT = path.join(REPO_ROOT, 'deploy', 'docker', 'host-id.js');
const run = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  new Promise<{ code: number; stderr: string }>((resolve) => {
    execFile(process.execPath, [SCRIPT, ...args], { env: { PATH: process.env.PATH, ...env } }, (err, _out, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr }),
    );
  });

describe('host-id init step', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-host-id-'));
  const out = path.join(dir, 'out', 'host-id');
  const nodes: Record<string, Record<string, string>> = {
    'node-a': { 'sdmesh.io/host-id': '3' },
    'node-b': { 'sdmesh.io/host-id': '3' },
    'node-c': { 'sdmesh.io/host-id': '9' },
    'node-d': { 'sdmesh.io/host-id': 'x' },
    'node-e': { 'sdmesh.io/host-id': '251' },
  };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url!, 'http://x');
    const name = url.pathname.replace('/api/v1/nodes', '').replace(/^\//, '');
    if (!name) {
      const [k, v] = (url.searchParams.get('labelSelector') ?? '').split('=');
      const items = Object.entries(nodes)
        .filter(([, l]) => l[k] === v)
        .map(([n, labels]) => ({ metadata: { name: n, labels } }));
      return res.end(JSON.stringify({ items }));
    }
    if (!nodes[name]) return res.writeHead(404).end('{}');
    res.end(JSON.stringify({ metadata: { name, labels: nodes[name] } }));
  });
  let api = '';
  beforeAll(async () => {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    api = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(() => {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('from a map: writes the id of its node; refuses a node not in the map', async () => {
    fs.mkdirSync(path.join(dir, 'map'));
    fs.writeFileSync(path.join(dir, 'map', 'node-a'), '12');
    expect(await run(['--node', 'node-a', '--out', out, '--from-map', path.join(dir, 'map')])).toEqual({ code: 0, stderr: '' });
    expect(fs.readFileSync(out, 'utf8')).toBe('12\n');
    const r = await run(['--node', 'node-z', '--out', out, '--from-map', path.join(dir, 'map')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('node node-z is not in hostIds.map');
  });

  it('from a node label: unique id ok; duplicate, invalid or missing label refused with a clear message', async () => {
    const env = { SDMESH_KUBE_API: api };
    expect(await run(['--node', 'node-c', '--out', out, '--from-label', 'sdmesh.io/host-id'], env)).toEqual({ code: 0, stderr: '' });
    expect(fs.readFileSync(out, 'utf8')).toBe('9\n');
    const dup = await run(['--node', 'node-a', '--out', out, '--from-label', 'sdmesh.io/host-id'], env);
    expect([dup.code, dup.stderr]).toEqual([2, expect.stringContaining('also the sdmesh.io/host-id label of node-b: host ids must be unique')]);
    const bad = await run(['--node', 'node-d', '--out', out, '--from-label', 'sdmesh.io/host-id'], env);
    expect(bad.stderr).toContain('a host id must be an integer 1..250');
    // Lease areas serve host ids 1..250 (sanlock's num_hosts): a higher id could never take a lease.
    const high = await run(['--node', 'node-e', '--out', out, '--from-label', 'sdmesh.io/host-id'], env);
    expect([high.code, high.stderr]).toEqual([2, expect.stringContaining('is 251: a host id must be 1..250')]);
    const missing = await run(['--node', 'node-c', '--out', out, '--from-label', 'other/label'], env);
    expect(missing.stderr).toContain('kubectl label node node-c other/label=<1..250>');
  });
});
