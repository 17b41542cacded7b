import { spawn } from 'node:child_process';
import path from 'node:path';
import { makeTestDir, pidAlive, removeTestDir, REPO_ROOT } from '../harness/paths';

/**
 * The README's first command (`make demo` = `node packages/localmesh/dist/cli.js`) with a temp
 * directory: it must reach "demo finished" with matching checksums, leave the mesh running, and
 * stop cleanly on Ctrl-C.
 */
describe("the README's first command: the demo", () => {
  const dir = makeTestDir('demo');
  afterAll(() => removeTestDir(dir));

  it('reaches "demo finished", the checksums match, and Ctrl-C stops everything cleanly', async () => {
    const child = spawn(process.execPath, [path.join(REPO_ROOT, 'packages/localmesh/dist/cli.js'), '--dir', dir], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      const deadline = Date.now() + 160_000;
      while (!out.includes('demo finished')) {
        if (child.exitCode !== null) throw new Error(`launcher exited early:\n${out}`);
        if (/demo (stopped|FAILED)/.test(out)) throw new Error(`the demo failed:\n${out}`);
        if (Date.now() > deadline) throw new Error(`no "demo finished" in time:\n${out}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      const before = /checksum before: sha256 ([0-9a-f]{64})/.exec(out)?.[1];
      const after = /checksum after: {2}sha256 ([0-9a-f]{64})/.exec(out)?.[1];
      expect(before).toBeDefined();
      expect(after).toBe(before);
      expect(out).toContain('checksums match');
      // What the demo shows: the move's steps with their hosts, both checks clean, what to try next.
      expect(out).toMatch(/copy-volume:[0-9a-f]{8}\s+DONE\s+host\d/);
      expect(out.match(/OK: no violations/g)).toHaveLength(2);
      expect(out).toContain('sdmctl hosts list');
      // The mesh stays up after the demo.
      await new Promise((r) => setTimeout(r, 500));
      expect(child.exitCode).toBeNull();
      expect(out).toContain('press Ctrl-C to stop');

      const pid = child.pid!;
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(out).toContain('stopped cleanly');
      expect(pidAlive(pid)).toBe(false);
    } finally {
      if (child.exitCode === null) {
        child.kill('SIGINT');
        await exited;
      }
    }
  });
});
