import { spawnSync } from 'node:child_process';
import { serviceMain, SERVICE_NAMES } from '@sdmesh/localmesh';

const run = (name: (typeof SERVICE_NAMES)[number], args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [serviceMain(name), ...args], {
    env: { PATH: process.env.PATH, ...env },
    encoding: 'utf8',
    timeout: 20000,
  });

describe('service configuration errors', () => {
  it.each(SERVICE_NAMES)('%s: --help prints usage and exits 0', (name) => {
    const r = run(name, ['--help']);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain(`Usage: sdmesh-${name} [options]`);
    expect(r.stdout).toContain('SDMESH_NATS_URL');
  });

  it.each([
    ['a bad port', ['--grpc-port', '99999'], { SDMESH_NATS_URL: 'nats://127.0.0.1:1' }, /--grpc-port \(port\): 99999 is out of range/],
    ['an unknown flag', ['--frobnicate'], { SDMESH_NATS_URL: 'nats://127.0.0.1:1' }, /unknown option --frobnicate/],
    ['a missing NATS URL', [], {}, /missing required option --nats-url/],
    ['a malformed NATS URL', [], { SDMESH_NATS_URL: '127.0.0.1' }, /SDMESH_NATS_URL \(url\): "127.0.0.1" is not a URL/],
    // Secure by default: no certificate, no start (unless --insecure is asked for).
    [
      'no TLS certificate',
      [],
      { SDMESH_NATS_URL: 'nats://127.0.0.1:1', SDMESH_NATS_USER: 'u', SDMESH_NATS_PASSWORD_FILE: '/dev/null', SDMESH_HOST_ID: '1' },
      /mTLS is required: give --tls-ca, --tls-cert and --tls-key/,
    ],
  ])('%s gives one line on stderr and exit code 2', (_what, args, env, message) => {
    for (const name of SERVICE_NAMES) {
      const r = run(name, args as string[], env as NodeJS.ProcessEnv);
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(new RegExp(`^sdmesh-${name}: error: `));
    }
  });

  it('scheduler: a request-id retention shorter than the operation retention is bad configuration (exit 2)', () => {
    const r = run('scheduler', ['--insecure', '--operation-retention-ms', '60000', '--request-id-retention-ms', '1000'], {
      SDMESH_NATS_URL: 'nats://127.0.0.1:1',
    });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([
      expect.stringMatching(/^sdmesh-scheduler: error: --request-id-retention-ms \(1000\) must be at least --operation-retention-ms \(60000\)/),
    ]);
    expect(run('scheduler', ['--operation-retention-ms', '0'], { SDMESH_NATS_URL: 'nats://127.0.0.1:1' }).stderr).toMatch(
      /--operation-retention-ms \(int\): 0 is out of range/,
    );
  });
});
