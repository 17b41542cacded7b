import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT, makeTestDir, removeTestDir } from '../harness/paths';

/**
 * A process that registers as a lease holder while its host has no sanlock daemon (not started,
 * or killed and not back yet) is told so: FAILED_PRECONDITION SANLOCK_DOWN, not INTERNAL (chaos
 * seed 702: a merge worker started while its host's daemon was killed failed INTERNAL). Each case
 * in its own process: libsanlock reads SANLOCK_RUN_DIR once per process.
 */
describe('LeaseHolder.register without a sanlock daemon', () => {
  const dir = makeTestDir('holder-register');
  afterAll(() => removeTestDir(dir));

  /** LeaseHolder.register in a new node process with this SANLOCK_RUN_DIR: the error's code name, reason and message. */
  const registerIn = (runDir: string) => {
    const script = `
      const { LeaseHolder, createLogger, GrpcStatus } = require(${JSON.stringify(path.join(REPO_ROOT, 'packages/common/dist'))});
      LeaseHolder.register({ leaseManagerAddress: 'unix:/nonexistent.sock', log: createLogger('test', 'silent') }).then(
        () => console.log(JSON.stringify({ registered: true })),
        (e) => console.log(JSON.stringify({ code: GrpcStatus[e.code] ?? String(e.code), reason: e.reason, message: e.message })),
      ).finally(() => process.exit(0));`;
    const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, SANLOCK_RUN_DIR: runDir }, encoding: 'utf8', timeout: 60_000 });
    expect(r.stderr).toBe('');
    return JSON.parse(r.stdout.trim().split('\n').pop()!) as { code: string; reason: string; message: string };
  };

  it('no socket in the run directory (daemon not started)', () => {
    const runDir = path.join(dir, 'never-started');
    fs.mkdirSync(runDir);
    const err = registerIn(runDir);
    expect([err.code, err.reason]).toEqual(['FAILED_PRECONDITION', 'SANLOCK_DOWN']);
    expect(err.message).toBe(`no sanlock daemon of this host to register with in ${runDir} (no socket): it is not running, or restarting`);
  });

  it('a socket left by a killed daemon, refusing connections', async () => {
    const runDir = path.join(dir, 'killed');
    fs.mkdirSync(runDir);
    const socket = path.join(runDir, 'sanlock.sock');
    // A process listening there, SIGKILLed: its socket file stays, and nobody accepts on it.
    const listener = spawn(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(socket)}, () => console.log('listening'))`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise((resolve) => listener.stdout.once('data', resolve));
    listener.kill('SIGKILL');
    await new Promise((resolve) => listener.once('exit', resolve));
    expect(fs.statSync(socket).isSocket()).toBe(true);
    const err = registerIn(runDir);
    expect([err.code, err.reason]).toEqual(['FAILED_PRECONDITION', 'SANLOCK_DOWN']);
    expect(err.message).toMatch(/\(its socket refuses connections\): it is not running, or restarting$/);
  });
});
