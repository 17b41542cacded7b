import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DockerfileParser } from 'dockerfile-ast';
import { REPO_ROOT } from '../../scripts/deploy-checks';

// No Docker engine runs here: the Dockerfile is checked by reading it.
const DOCKER_DIR = path.join(REPO_ROOT, 'deploy', 'docker');
const dockerfile = DockerfileParser.parse(fs.readFileSync(path.join(DOCKER_DIR, 'Dockerfile'), 'utf8'));
const instructions = dockerfile.getInstructions();

/** Instructions of one stage (FROM ... AS name up to the next FROM). */
function stage(name: string) {
  const out: { keyword: string; args: string[]; text: string }[] = [];
  let inside = false;
  for (const ins of instructions) {
    const keyword = ins.getKeyword();
    const args = ins.getArguments().map((a) => a.getValue());
    if (keyword === 'FROM') inside = args[2]?.toLowerCase() === name;
    else if (inside) out.push({ keyword, args, text: ins.getTextContent() });
  }
  return out;
}

describe('deploy/docker/Dockerfile (lint: no Docker engine here)', () => {
  const froms = instructions.filter((i) => i.getKeyword() === 'FROM').map((i) => i.getArguments().map((a) => a.getValue()));

  it('has the build, host and scheduler stages, each from a pinned Node 20 Debian 12 base', () => {
    expect(froms.map((f) => f[2])).toEqual(['build', 'host', 'scheduler']);
    for (const [image] of froms) {
      // An exact version tag (or a digest), never latest or a floating major.
      expect(image).toMatch(/^node:20\.\d+\.\d+-bookworm-slim(@sha256:[a-f0-9]{64})?$/);
    }
  });

  it('runs the scheduler as a non-root user', () => {
    const users = stage('scheduler').filter((i) => i.keyword === 'USER');
    expect(users).toHaveLength(1);
    expect(users[0].args[0]).toMatch(/^[1-9]\d*(:[1-9]\d*)?$/);
  });

  it('installs sanlock, qemu-utils and procps (kill) in the host image', () => {
    const run = stage('host')
      .filter((i) => i.keyword === 'RUN')
      .map((i) => i.text)
      .join('\n');
    for (const pkg of ['sanlock', 'qemu-utils', 'procps']) expect(run).toMatch(new RegExp(`\\b${pkg}\\b`));
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

  it('every file the images run exists in the build output', () => {
    // COPY sources taken from the repository (not --from=build) exist.
    for (const ins of instructions.filter((i) => i.getKeyword() === 'COPY')) {
      const args = ins.getArguments().map((a) => a.getValue());
      if (/--from=/.test(ins.getTextContent())) continue;
      for (const src of args.slice(0, -1)) expect([src, fs.existsSync(path.join(REPO_ROOT, src))]).toEqual([src, true]);
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
      ]),
    );
    for (const p of paths) expect([p, fs.existsSync(path.join(REPO_ROOT, p))]).toEqual([p, true]);
    for (const stageName of ['host', 'scheduler']) {
      const ep = stage(stageName).find((i) => i.keyword === 'ENTRYPOINT');
      expect(ep?.text).toContain('/usr/local/bin/sdmesh-run');
    }
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
    expect(r).toContain('usage: sdmesh-run lease-manager|metadata-tx|data-mover|gc|scheduler');
    expect(r).toContain('exit 2');
  });
});
