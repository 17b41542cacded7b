import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, eventFilter, eventSubject, natsAuthFromConfig, natsConnectionOptions } from '@sdmesh/common/internal';
import { natsPermissions } from '@sdmesh/localmesh';

describe('NATS credentials from the common options', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-nats-auth-'));
  const passwordFile = path.join(dir, 'host1.password');
  fs.writeFileSync(passwordFile, 'secret\n', { mode: 0o600 });
  const base = { natsUser: '', natsPasswordFile: '', tlsCa: '', insecure: false };
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('refuses to start without credentials unless --insecure, naming the flags', () => {
    expect(() => natsAuthFromConfig(base)).toThrow(ConfigError);
    expect(() => natsAuthFromConfig(base)).toThrow(/--nats-user and --nats-password-file \(SDMESH_NATS_USER, SDMESH_NATS_PASSWORD_FILE\), or --insecure/);
    expect(() => natsAuthFromConfig({ ...base, natsUser: 'host1', natsPasswordFile: passwordFile })).toThrow(/NATS needs TLS: pass --tls-ca/);
    expect(() => natsAuthFromConfig({ ...base, natsUser: 'host1' })).toThrow(/go together/);
    expect(() => natsAuthFromConfig({ ...base, natsUser: 'host1', natsPasswordFile: path.join(dir, 'missing'), tlsCa: '/ca.pem' })).toThrow(
      /--nats-password-file .*missing/,
    );
    expect(natsAuthFromConfig({ ...base, insecure: true })).toEqual({ user: undefined, passwordFile: undefined, caFile: undefined });
  });

  it('reads the password from the file at every connect (rotation)', () => {
    const auth = natsAuthFromConfig({ ...base, natsUser: 'host1', natsPasswordFile: passwordFile, tlsCa: '/ca.pem' });
    const opts = natsConnectionOptions('nats://127.0.0.1:4222', auth);
    expect(opts.tls).toEqual({ caFile: '/ca.pem' });
    const authenticator = opts.authenticator as (nonce?: string) => { user: string; pass: string };
    expect(authenticator()).toEqual({ user: 'host1', pass: 'secret' });
    fs.writeFileSync(passwordFile, 'rotated\n');
    expect(authenticator()).toEqual({ user: 'host1', pass: 'rotated' });
  });
});

describe('event subjects and permissions', () => {
  it('end with the publishing host, which the host permission pins', () => {
    const payload = { $case: 'gc' as const, gc: { domainId: 'dom-1' } as never };
    expect(eventSubject(payload, 'host1')).toBe('sdmesh.events.gc.dom-1.host1');
    expect(eventSubject(payload, 'a.b')).toBe('sdmesh.events.gc.dom-1.a_b');
    expect(eventFilter('gc')).toBe('sdmesh.events.gc.*.*');
    expect(natsPermissions('host', 'host1')).toEqual({ publish: { allow: ['sdmesh.events.*.*.host1'] }, subscribe: { deny: ['>'] } });
  });
});
