import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { LOCAL_USERS, type LocalMesh } from './mesh';
import { REPO_ROOT } from './service-process';

/**
 * The demo `make demo` runs once the mesh is up. It drives the mesh the way a user would,
 * through `sdmctl` (each command is printed before it runs): two storage domains, a disk filled
 * with data, a snapshot with more data on top, a move to the other domain with a live progress
 * bar, the hosts that ran each step, the guest-visible checksum before and after (computed by a
 * data-mover), and `sdmctl check` on both domains. Nothing is faked: a step that fails stops the
 * demo with the server's message, and the mesh stays up either way.
 */

export const SDMCTL = path.join(REPO_ROOT, 'packages/sdmctl/dist/cli.js');

export interface DemoOptions {
  mesh: LocalMesh;
  /** Aborted on Ctrl-C: the running sdmctl is stopped and the demo ends. */
  signal: AbortSignal;
  print?: (line: string) => void;
  /** Size of the demo disk (bytes) and how much random data goes into it. */
  diskBytes?: number;
  dataBytes?: number;
}

export interface DemoResult {
  ok: boolean;
  checksumBefore?: string;
  checksumAfter?: string;
  /** What could not be done, in plain words. */
  skipped: string[];
}

const MiB = 1024 * 1024;

/** The demo was interrupted (Ctrl-C). */
export class DemoStopped extends Error {}

/**
 * sdmctl as the demos run it (this one and the containers demo, container-mesh.ts): `shown`
 * prints the command and lets its output (a --wait progress bar) reach the terminal; `json`
 * runs it with -o json and returns the parsed answer, or rejects with sdmctl's message.
 */
export function sdmctlRunner(
  env: NodeJS.ProcessEnv,
  signal: AbortSignal,
  print: (line: string) => void,
): { shown: (args: string[]) => Promise<number>; json: <T>(args: string[]) => Promise<T> } {
  const show = (args: string[]) => print(`\n$ sdmctl ${args.map((a) => (/[\s"]/.test(a) ? JSON.stringify(a) : a)).join(' ')}`);
  const shown = (args: string[]): Promise<number> => {
    show(args);
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, [SDMCTL, ...args], { env, stdio: ['ignore', 'inherit', 'inherit'] });
      const onAbort = () => child.kill('SIGINT');
      signal.addEventListener('abort', onAbort, { once: true });
      child.once('error', reject);
      child.once('exit', (code) => {
        signal.removeEventListener('abort', onAbort);
        resolve(code ?? 1);
      });
    });
  };
  const json = <T>(args: string[]): Promise<T> => {
    return new Promise((resolve, reject) => {
      const child = execFile(process.execPath, [SDMCTL, ...args, '-o', 'json'], { env, signal, maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
        if (signal.aborted) return reject(new DemoStopped('interrupted'));
        if (err)
          return reject(new Error(`sdmctl ${args.slice(0, 2).join(' ')} failed (exit ${(err as { code?: unknown }).code}): ${stderr.trim() || err.message}`));
        try {
          resolve(JSON.parse(stdout) as T);
        } catch {
          reject(new Error(`sdmctl ${args.slice(0, 2).join(' ')} printed no JSON: ${stdout.slice(0, 200)}`));
        }
      });
      child.stdin?.end();
    });
  };
  return { shown, json };
}

export async function runDemo(opts: DemoOptions): Promise<DemoResult> {
  const print = opts.print ?? ((l: string) => console.log(l));
  const mesh = opts.mesh;
  const address = mesh.schedulerAddresses;
  const result: DemoResult = { ok: false, skipped: [] };
  if (!address) {
    print('demo: skipped: the mesh runs without a scheduler, so there is no API to drive');
    result.skipped.push('everything (no scheduler)');
    return result;
  }
  const env = {
    ...process.env,
    SDMESH_ADDRESS: address,
    ...mesh.nats.clientEnv('sdmctl'),
    ...mesh.tlsEnv({ kind: 'user', name: LOCAL_USERS.admin }),
    SDMCTL_OUTPUT: '',
  };
  const { shown: sdmctlShown, json: sdmctlJson } = sdmctlRunner(env, opts.signal, print);

  const checkAborted = () => {
    if (opts.signal.aborted) throw new DemoStopped('interrupted');
  };

  try {
    print('\n== demo: what sdmesh does, through sdmctl ==');
    checkAborted();
    await sdmctlShown(['hosts', 'list']);

    // 1. Two storage domains (fresh names when an earlier demo left some in this directory).
    const existing = new Set((await sdmctlJson<Array<{ name: string }>>(['domains', 'list'])).map((d) => d.name));
    let n = 1;
    const suffix = () => (n === 1 ? '' : `-${n}`);
    while (
      existing.has(`gold${suffix()}`) ||
      existing.has(`silver${suffix()}`) ||
      fs.existsSync(path.join(mesh.storageDir, `gold${suffix()}`)) ||
      fs.existsSync(path.join(mesh.storageDir, `silver${suffix()}`))
    )
      n++;
    const [gold, silver] = [`gold${suffix()}`, `silver${suffix()}`];
    const domains: Record<string, { id: string; path: string }> = {};
    for (const name of [gold, silver]) {
      const op = await sdmctlJson<OpJson>(['domains', 'create', '--name', name, '--path', path.join(mesh.storageDir, name), '--wait']);
      const d = op.storageDomain!;
      domains[name] = { id: d.id, path: d.path };
      print(`  storage domain ${name} = ${d.id} at ${d.path}${stepHosts(op)}`);
    }

    // 2. A disk, filled with data as a guest would write it (random blocks, holes between).
    const diskBytes = opts.diskBytes ?? 1024 * MiB;
    const dataBytes = Math.min(opts.dataBytes ?? 192 * MiB, diskBytes);
    const created = await sdmctlJson<OpJson>(['disks', 'create', '--domain', gold, '--size', String(diskBytes), '--description', 'demo disk', '--wait']);
    const disk = created.disk!;
    const base = disk.volumes[0]!;
    print(`  disk ${disk.id} (${diskBytes / MiB} MiB, raw, sparse)${stepHosts(created)}`);
    print(`\nwriting ${dataBytes / MiB} MiB of random data into its volume ${base.path}`);
    await fillRandom(base.path, diskBytes, dataBytes);

    // 3. A snapshot, and more data written into the new qcow2 leaf.
    const snap = await sdmctlJson<OpJson>(['disks', 'snapshot', '--domain', gold, disk.id, '--description', 'after the first fill', '--wait']);
    const leaf = snap.disk!.volumes.at(-1)!;
    print(`  snapshot volume ${leaf.id} (qcow2, backed by ${base.id.slice(0, 8)})${stepHosts(snap)}`);
    if (await hasQemuIo()) {
      print(`writing 16 MiB more into the snapshot with qemu-io (the chain now has data in both layers)`);
      await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${Math.floor(diskBytes / 2)} 16M`, leaf.path]);
    } else {
      print('skipped: writing into the snapshot (qemu-io is not installed); the snapshot layer stays empty');
      result.skipped.push('data in the snapshot layer (no qemu-io)');
    }

    // 4. Checksum of what the guest sees, then the move with its live progress bar.
    const checksum = async (domainPath: string, volumeId: string) => {
      const host = mesh.hosts.find((h) => h.services['data-mover']);
      if (!host) throw new Error('no data-mover in the mesh to compute a checksum');
      // Asks the data-mover directly (as the scheduler would): the public API has no checksum call.
      const client = createClient(pb.DataMoverServiceDefinition, host.services['data-mover']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
      try {
        const res = await client.checksumVolume({ volume: { domainPath, imageId: disk.id, volumeId } }, { timeoutMs: 300_000, signal: opts.signal });
        return { sum: res.checksum, host: host.name, bytes: res.bytes };
      } finally {
        client.close();
      }
    };
    const before = await checksum(domains[gold]!.path, leaf.id);
    result.checksumBefore = before.sum;
    print(
      `\nchecksum before: sha256 ${before.sum}  (guest-visible ${before.bytes / MiB} MiB of the chain in ${gold}, computed by ${before.host}'s data-mover)`,
    );

    const moveRequest = `demo-move-${randomBytes(4).toString('hex')}`;
    const moveCode = await sdmctlShown(['disks', 'move', '--domain', gold, disk.id, '--to', silver, '--wait', '--request-id', moveRequest]);
    checkAborted();
    if (moveCode !== 0) throw new Error(`the move failed (sdmctl exit ${moveCode}); the message is above`);

    // 5. Which host did which step.
    const ops = await sdmctlJson<OpJson[]>(['ops', 'list', '--type', 'move_disk']);
    const move = ops.find((o) => o.requestId === moveRequest);
    if (move) await sdmctlShown(['ops', 'get', move.name]);
    else result.skipped.push('showing the move steps (operation not found in ops list)');

    const moved = await sdmctlJson<DiskJson>(['disks', 'get', '--domain', silver, disk.id]);
    const after = await checksum(domains[silver]!.path, moved.volumes.at(-1)!.id);
    result.checksumAfter = after.sum;
    print(`\nchecksum before: sha256 ${before.sum}`);
    print(`checksum after:  sha256 ${after.sum}  (the chain in ${silver}, computed by ${after.host}'s data-mover)`);
    print(after.sum === before.sum ? 'checksums match: the disk moved intact' : 'CHECKSUMS DIFFER: the moved disk is not what was written');

    // 6. The on-disk invariants of both domains.
    let checksOk = true;
    for (const name of [gold, silver]) checksOk = (await sdmctlShown(['check', domains[name]!.path])) === 0 && checksOk;

    result.ok = after.sum === before.sum && checksOk;
    if (!result.ok) {
      print('\ndemo FAILED (see above); the mesh stays up for a look');
      return result;
    }
    print('\ndemo finished');
    if (result.skipped.length) print(`(skipped: ${result.skipped.join('; ')})`);
    print(
      nextCommands(
        address,
        { ...mesh.nats.clientEnv('sdmctl'), ...mesh.tlsEnv({ kind: 'user', name: LOCAL_USERS.admin }) },
        silver,
        disk.id,
        domains[silver]!.path,
      ),
    );
    return result;
  } catch (err) {
    if (err instanceof DemoStopped || opts.signal.aborted) {
      print('demo interrupted');
      return result;
    }
    print(`\ndemo stopped: ${(err as Error).message}`);
    print('the mesh stays up; the commands below still work');
    return result;
  }
}

interface DiskJson {
  id: string;
  volumes: Array<{ id: string; path: string }>;
}
interface OpJson {
  name: string;
  requestId: string;
  steps?: Array<{ name: string; host?: string }>;
  storageDomain?: { id: string; path: string };
  disk?: DiskJson;
}

/** " (format-domain on host1)" — which host ran each step that has one. */
function stepHosts(op: OpJson): string {
  const parts = (op.steps ?? []).filter((s) => s.host).map((s) => `${s.name.replace(/:([0-9a-f]{8})[0-9a-f-]{28}/, ':$1')} on ${s.host}`);
  return parts.length ? `  [${parts.join(', ')}]` : '';
}

/** Writes random blocks spread over the file, leaving holes: a sparse disk with real data. */
export async function fillRandom(file: string, size: number, dataBytes: number): Promise<void> {
  const chunk = 4 * MiB;
  const chunks = Math.max(1, Math.floor(dataBytes / chunk));
  const stride = Math.floor(size / chunks / MiB) * MiB;
  const fh = await fs.promises.open(file, 'r+');
  try {
    for (let i = 0; i < chunks; i++) await fh.write(randomBytes(chunk), 0, chunk, i * stride);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(cmd, args, (err, stdout, stderr) => (err ? reject(new Error(`${cmd} failed: ${stderr.trim() || err.message}`)) : resolve(stdout))),
  );
}

const hasQemuIo = () =>
  run('qemu-io', ['--version']).then(
    () => true,
    () => false,
  );

function nextCommands(address: string, natsEnv: NodeJS.ProcessEnv, domain: string, diskId: string, domainPath: string): string {
  return [
    '',
    'The mesh keeps running. Try, in another terminal:',
    `  export SDMESH_ADDRESS=${address} ${Object.entries(natsEnv)
      .map(([k, v]) => `${k}=${v ?? ''}`)
      .join(' ')}`,
    `  alias sdmctl="node ${SDMCTL}"`,
    '  sdmctl hosts list',
    '  sdmctl domains list',
    `  sdmctl disks get --domain ${domain} ${diskId}`,
    '  sdmctl ops list',
    '  sdmctl events --kind operation          # then, in a third terminal, a copy:',
    `  sdmctl disks copy --domain ${domain} ${diskId} --to ${domain} --collapse --wait`,
    `  sdmctl check ${domainPath}`,
    '  sdmctl --help',
    'Ctrl-C here stops every process of the mesh.',
  ].join('\n');
}
