import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { decodeVolumeRecord, encodeVolumeRecord } from '@sdmesh/common/internal';
import { LocalMesh, LocalPki } from '@sdmesh/localmesh';
import { makeTestDir, removeTestDir, REPO_ROOT } from '../harness/paths';

/**
 * sdmctl as a subprocess against a running mesh (nats-server, 2 real sanlock hosts with every
 * per-host service, a scheduler): table and JSON output for each resource, --wait exit codes on
 * success and failure, events, and `check` on healthy and hand-corrupted domains.
 */
const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');
const MiB = 1024 * 1024;

interface Result {
  code: number;
  out: string;
  err: string;
}

describe('sdmctl against a real mesh', () => {
  const dir = makeTestDir('sdmctl');
  const mesh = new LocalMesh({ dir, hosts: 2, env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0' } });
  let env: NodeJS.ProcessEnv;

  const sdmctl = (...args: string[]): Promise<Result> =>
    new Promise((resolve) => {
      execFile(process.execPath, [SDMCTL, ...args], { env, timeout: 150_000, maxBuffer: 16 * MiB }, (err, out, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
        resolve({ code, out, err: stderr });
      });
    });
  const json = async <T>(...args: string[]): Promise<T> => {
    const r = await sdmctl(...args, '-o', 'json');
    if (r.code !== 0) throw new Error(`sdmctl ${args.join(' ')} exit ${r.code}: ${r.err}`);
    return JSON.parse(r.out) as T;
  };

  interface Vol {
    id: string;
    path: string;
    legality: string;
  }
  interface DiskJson {
    id: string;
    storageDomainId: string;
    volumes: Vol[];
  }
  let gold: { id: string; path: string };
  let silver: { id: string; path: string };
  let disk: DiskJson;

  beforeAll(async () => {
    await mesh.start();
    env = {
      ...process.env,
      SDMESH_ADDRESS: mesh.scheduler!.grpcAddress,
      ...mesh.nats.clientEnv('sdmctl'),
      ...mesh.tlsEnv({ kind: 'user', name: 'admin' }),
      SDMCTL_OUTPUT: '',
    };
    // Both hosts healthy before anything is placed on them (generous: the mesh has just started).
    const until = Date.now() + 90_000;
    for (;;) {
      const hosts = await json<Array<{ healthy?: boolean }>>('hosts', 'list');
      if (hosts.length === 2 && hosts.every((h) => h.healthy)) break;
      if (Date.now() > until) throw new Error('hosts not healthy');
      await new Promise((r) => setTimeout(r, 500));
    }
  }, 180_000);
  afterAll(async () => {
    await mesh.stop();
    removeTestDir(dir);
  }, 60_000);

  test('domains: create --wait (table and JSON), list, get, by name or id', async () => {
    const table = await sdmctl('domains', 'create', '--name', 'gold', '--path', path.join(mesh.storageDir, 'gold'), '--wait');
    expect(table.err).toBe('');
    expect(table.code).toBe(0);
    expect(table.out).toMatch(/^CREATE_STORAGE_DOMAIN done in .* \(operations\/[0-9a-f-]{36}\)\n/);
    expect(table.out).toMatch(/format-domain\s+DONE\s+host\d/);
    expect(table.out).toMatch(/Name:\s+gold\n/);
    const op = await json<{ status: string; storageDomain: { id: string; path: string } }>(
      'domains',
      'create',
      '--name',
      'silver',
      '--path',
      path.join(mesh.storageDir, 'silver'),
      '--wait',
    );
    expect(op.status).toBe('OPERATION_STATUS_DONE');
    silver = op.storageDomain;
    const list = await sdmctl('domains', 'list');
    expect(list.out.split('\n')[0]).toMatch(/^ID\s+NAME\s+STATUS\s+DISKS\s+VOLUMES\s+FREE\s+CAPACITY\s+PATH$/);
    expect(list.out).toMatch(/\bgold\s+ACTIVE\b/);
    const all = await json<Array<{ id: string; name: string; path: string }>>('domains', 'list');
    expect(all.map((d) => d.name).sort()).toEqual(['gold', 'silver']);
    gold = all.find((d) => d.name === 'gold')!;
    expect((await json<{ id: string }>('domains', 'get', 'gold')).id).toBe(gold.id);
    expect((await sdmctl('domains', 'get', gold.id)).out).toMatch(/Status:\s+ACTIVE/);
    const missing = await sdmctl('domains', 'get', 'bronze');
    expect(missing).toMatchObject({ code: 1, out: '' });
    expect(missing.err).toBe('sdmctl: no storage domain with id or name "bronze" (sdmctl domains list shows them)\n');
  });

  test('disks: create --wait, list, get (table and JSON), snapshot, copy; ops list/get/wait/watch; hosts list/get', async () => {
    const created = await json<{ disk: DiskJson }>('disks', 'create', '--domain', 'gold', '--size', '64M', '--description', 'sdmctl test', '--wait');
    disk = created.disk;
    expect(disk.volumes).toHaveLength(1);
    const fd = fs.openSync(disk.volumes[0]!.path, 'r+');
    fs.writeSync(fd, Buffer.alloc(4 * MiB, 7), 0, 4 * MiB, 0);
    fs.closeSync(fd);

    const list = await sdmctl('disks', 'list', '-d', 'gold');
    expect(list.out).toMatch(new RegExp(`^ID\\s+DOMAIN\\s+CAPACITY.*\\n${disk.id}\\s+${gold.id}\\s+64 MiB\\s+`));
    expect((await json<DiskJson[]>('disks', 'list')).map((d) => d.id)).toEqual([disk.id]);
    const get = await sdmctl('disks', 'get', '-d', 'gold', disk.id);
    expect(get.out).toMatch(/Capacity:\s+64 MiB/);
    expect(get.out).toMatch(new RegExp(`${disk.volumes[0]!.id}\\s+-\\s+RAW\\s+SPARSE\\s+4 MiB\\s+LEGAL\\s+0\\s+slot 3\\s+${disk.volumes[0]!.path}`));

    const snap = await sdmctl('disks', 'snapshot', '-d', gold.id, disk.id, '--wait');
    expect(snap.code).toBe(0);
    expect(snap.out).toMatch(/create-snapshot\s+DONE\s+host\d/);
    expect((await json<DiskJson>('disks', 'get', '-d', 'gold', disk.id)).volumes).toHaveLength(2);

    const copy = await json<{ disk: DiskJson; steps: Array<{ name: string; host: string }> }>(
      'disks',
      'copy',
      '-d',
      'gold',
      disk.id,
      '--to',
      'silver',
      '--wait',
      '--request-id',
      'sdmctl-copy-1',
    );
    expect(copy.disk.storageDomainId).toBe(silver.id);
    expect(copy.steps.filter((s) => s.name.startsWith('copy-volume')).every((s) => /^host\d$/.test(s.host))).toBe(true);
    // The same --request-id: the same operation, not a second copy.
    const again = await json<{ name: string; disk: DiskJson }>('disks', 'copy', '-d', 'gold', disk.id, '--to', 'silver', '--request-id', 'sdmctl-copy-1');
    expect(again.disk.id).toBe(copy.disk.id);

    const ops = await json<Array<{ name: string; type: string; status: string; requestId: string }>>('ops', 'list', '--type', 'copy_disk');
    expect(ops).toEqual([expect.objectContaining({ type: 'OPERATION_TYPE_COPY_DISK', status: 'OPERATION_STATUS_DONE', requestId: 'sdmctl-copy-1' })]);
    const opsTable = await sdmctl('ops', 'list');
    expect(opsTable.out.split('\n')[0]).toMatch(/^OPERATION\s+TYPE\s+STATUS\s+STEP\s+PROGRESS\s+CREATED\s+TARGET$/);
    expect(opsTable.out).toMatch(/COPY_DISK\s+DONE/);
    const id = ops[0]!.name.replace('operations/', '');
    const opGet = await sdmctl('ops', 'get', id);
    expect(opGet.out).toMatch(/Status:\s+DONE/);
    expect(opGet.out).toMatch(/copy-volume:[0-9a-f]{8}\s+DONE\s+host\d\s+1\s+/);
    expect((await json<{ name: string }>('ops', 'get', ops[0]!.name)).name).toBe(ops[0]!.name);
    expect(await sdmctl('ops', 'wait', id)).toMatchObject({ code: 0 });
    const watch = await sdmctl('ops', 'watch', id);
    expect(watch.code).toBe(0);
    expect(watch.out).toMatch(/DONE/);
    expect((await sdmctl('ops', 'get', '00000000-0000-4000-8000-000000000000')).code).toBe(1);

    const hosts = await sdmctl('hosts', 'list');
    expect(hosts.out).toMatch(/^NAME\s+HEALTHY\s+HOST ID/);
    expect(hosts.out).toMatch(/\nhost1\s+yes\s+/);
    const hostJson = await json<{ name: string; dataMoverAddress: string }>('hosts', 'get', 'host2');
    expect(hostJson.name).toBe('host2');
    expect(hostJson.dataMoverAddress).toBe(mesh.hosts[1]!.services['data-mover']!.grpcAddress);
    expect((await sdmctl('hosts', 'get', 'host2')).out).toMatch(/data-mover:\s+127\.0\.0\.1:\d+/);
    expect(await sdmctl('hosts', 'get', 'host9')).toMatchObject({ code: 1, err: expect.stringContaining('HOST_NOT_FOUND') });
  });

  test('--wait exit codes: 0 when DONE, 1 with the server message when the operation FAILED; 2 for INVALID_ARGUMENT', async () => {
    const busy = path.join(mesh.storageDir, 'not-empty');
    fs.mkdirSync(busy);
    fs.writeFileSync(path.join(busy, 'someone-elses-file'), 'x');
    const fail = await sdmctl('domains', 'create', '--name', 'busy', '--path', busy, '--wait');
    expect(fail.code).toBe(1);
    expect(fail.err).toMatch(/^sdmctl: CREATE_STORAGE_DOMAIN FAILED at step format-domain on host\d: .+ \(operations\/[0-9a-f-]{36}\)\n$/);
    expect(fail.err).not.toContain('    at ');
    const failJson = await sdmctl('domains', 'create', '--name', 'busy2', '--path', busy, '--wait', '-o', 'json');
    expect(failJson.code).toBe(1);
    expect(JSON.parse(failJson.out).status).toBe('OPERATION_STATUS_FAILED');
    const bad = await sdmctl('domains', 'create', '--name', 'rel', '--path', 'relative/path', '--wait');
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/INVALID_ARGUMENT/);
    const same = await sdmctl('disks', 'move', '-d', 'gold', disk.id, '--to', 'gold', '--wait');
    expect(same.code).toBe(2);
    expect(same.err).toContain('SAME_DOMAIN');
  });

  test('TLS and roles: a viewer is told which role it lacks, an untrusted server or an expired certificate is named, and nothing runs', async () => {
    const as = (extra: NodeJS.ProcessEnv, ...args: string[]): Promise<Result> =>
      new Promise((resolve) =>
        execFile(process.execPath, [SDMCTL, ...args], { env: { ...env, ...extra }, timeout: 60_000 }, (err, out, stderr) =>
          resolve({ code: err ? Number((err as { code?: number }).code ?? -1) : 0, out, err: stderr }),
        ),
      );
    const viewer = mesh.tlsEnv({ kind: 'user', name: 'viewer' });
    expect((await as(viewer, 'disks', 'list', '-d', 'gold')).code).toBe(0);
    const denied = await as(viewer, 'disks', 'delete', '-d', 'gold', disk.id, '--wait');
    expect(denied.code).toBe(1);
    expect(denied.err).toMatch(/needs role operator; user "viewer" has role viewer \[PERMISSION_DENIED, MISSING_ROLE\]/);
    // A CA that did not sign the scheduler's certificate.
    const other = new LocalPki(path.join(dir, 'other-pki'), 'other CA').forIdentity({ kind: 'user', name: 'admin' });
    const untrusted = await as(LocalPki.env(other), 'hosts', 'list');
    expect(untrusted.code).toBe(3);
    expect(untrusted.err).toMatch(/not signed by the CA in --tls-ca/);
    const expired = mesh.pki.issue('user-admin-expired', ['URI:sdmesh://user/admin'], {
      notBefore: new Date(Date.now() - 3 * 86400_000),
      notAfter: new Date(Date.now() - 86400_000),
    });
    const old = await as(LocalPki.env(expired), 'hosts', 'list');
    expect(old.code).toBe(3);
    expect(old.err).toMatch(/client certificate.*check --tls-cert.*\[UNAUTHENTICATED, NO_CLIENT_CERTIFICATE\]/);
    // Still there.
    expect((await json<DiskJson>('disks', 'get', '-d', 'gold', disk.id)).id).toBe(disk.id);
  });

  test('events: one readable line per event, JSON lines with -o json', async () => {
    const child = spawn(process.execPath, [SDMCTL, 'events', '--kind', 'operation', '--count', '2', '-o', 'json'], { env });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    while (!err.includes('listening on')) await new Promise((r) => setTimeout(r, 100));
    expect((await sdmctl('disks', 'create', '-d', 'silver', '--size', '1M', '--wait')).code).toBe(0);
    expect(await exited).toBe(0);
    const events = out
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { sourceService: string; operation?: { operationName: string } });
    expect(events).toHaveLength(2);
    expect(events.every((e) => e.operation?.operationName.startsWith('operations/'))).toBe(true);

    const text = spawn(process.execPath, [SDMCTL, 'events', '--kind', 'volume', '--count', '1'], { env });
    let line = '';
    let textErr = '';
    text.stdout.on('data', (d: Buffer) => (line += d.toString()));
    text.stderr.on('data', (d: Buffer) => (textErr += d.toString()));
    const textExit = new Promise<number | null>((resolve) => text.once('exit', (c) => resolve(c)));
    while (!textErr.includes('listening on')) await new Promise((r) => setTimeout(r, 100));
    expect((await sdmctl('disks', 'create', '-d', 'silver', '--size', '1M', '--wait')).code).toBe(0);
    expect(await textExit).toBe(0);
    expect(line).toMatch(/^\d\d:\d\d:\d\d\.\d{3} {2}host\d\/metadata-tx\s+volume\s+CREATED volume [0-9a-f]{8} image [0-9a-f]{8} domain [0-9a-f]{8} /);
  });

  test('check: clean on the real domains; catches hand-edited metadata and a duplicated lease slot', async () => {
    for (const d of [gold, silver]) {
      const r = await sdmctl('check', d.path);
      expect({ path: d.path, code: r.code, err: r.err }).toEqual({ path: d.path, code: 0, err: '' });
      expect(r.out).toContain('OK: no violations\n');
      // Real sanlock leases: every slot is named after its volume, so no warning at all.
      expect(r.out).not.toContain('WARNING');
    }
    const report = await json<{ ok: boolean; volumes: number; runningOperations: { checked: boolean } }>('check', gold.path);
    // SDMESH_ADDRESS is set: ILLEGAL volumes would be judged against the running operations.
    expect(report).toMatchObject({ ok: true, volumes: 2, runningOperations: { checked: true } });

    const [base, leaf] = (await json<DiskJson>('disks', 'get', '-d', 'gold', disk.id)).volumes;
    const baseMeta = `${base!.path}.meta`;
    const leafMeta = `${leaf!.path}.meta`;
    const original = fs.readFileSync(leafMeta);
    try {
      // A volume's metadata edited by hand: its checksum no longer matches.
      fs.writeFileSync(leafMeta, original.toString().replace(/DESCRIPTION=.*/, 'DESCRIPTION=edited by hand'));
      const edited = await sdmctl('check', gold.path);
      expect(edited.code).toBe(1);
      expect(edited.out).toMatch(/VIOLATION\s+volume-metadata\s+images\/[0-9a-f-]+\/[0-9a-f-]+\.meta\s+.*checksum mismatch.*\[CHECKSUM_MISMATCH\]/);
      // A duplicated lease slot, with a valid checksum: only the cross-checks see it.
      const baseSlot = decodeVolumeRecord(fs.readFileSync(baseMeta), 'base').leaseSlot;
      fs.writeFileSync(leafMeta, encodeVolumeRecord({ ...decodeVolumeRecord(original, 'leaf'), leaseSlot: baseSlot }));
      const dupRun = await sdmctl('check', gold.path, '-o', 'json');
      expect(dupRun.code).toBe(1);
      const dup = JSON.parse(dupRun.out) as { ok: boolean; violations: Array<{ check: string; message: string }> };
      expect(dup.ok).toBe(false);
      expect(dup.violations.map((v) => v.check).sort()).toEqual(['lease-slot', 'shared-lease-slot']);
      expect(dup.violations.find((v) => v.check === 'lease-slot')!.message).toContain(`holds the lease of ${gold.id}:${base!.id}, not of volume ${leaf!.id}`);
    } finally {
      fs.writeFileSync(leafMeta, original);
    }
    expect((await sdmctl('check', gold.path)).code).toBe(0);
  });
});
