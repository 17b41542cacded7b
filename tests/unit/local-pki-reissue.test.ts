import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalPki } from '@sdmesh/localmesh';

/** LocalPki.reissue: the rotation the mTLS rotation test and operators' scripts rely on. */
describe('LocalPki.reissue', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-pki-reissue-'));
  const pki = new LocalPki(path.join(dir, 'pki'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  const read = (file: string) => new crypto.X509Certificate(fs.readFileSync(file));
  const publicKey = (keyFile: string) => crypto.createPublicKey(fs.readFileSync(keyFile)).export({ format: 'der', type: 'spki' }).toString('hex');

  it('issues every certificate again with a new key pair and serial, the same names, atomically in place', () => {
    const lm = pki.forIdentity({ kind: 'host', host: 'host1', service: 'lease-manager' });
    const nats = pki.issue('nats-server', ['URI:sdmesh://nats-server']);
    const before = { cert: read(lm.cert), key: publicKey(lm.key), ino: fs.statSync(lm.cert).ino };
    // Issued once: asking again returns the same files untouched.
    pki.forIdentity({ kind: 'host', host: 'host1', service: 'lease-manager' });
    expect(read(lm.cert).serialNumber).toBe(before.cert.serialNumber);

    expect(pki.issuedNames()).toEqual(['host1-lease-manager', 'nats-server']);
    const out = pki.reissue();
    expect(out.map((c) => c.name)).toEqual(['host1-lease-manager', 'nats-server']);
    expect(out[0]).toEqual(lm);

    const after = read(lm.cert);
    expect(after.serialNumber).not.toBe(before.cert.serialNumber);
    expect(publicKey(lm.key)).not.toBe(before.key);
    expect(after.checkPrivateKey(crypto.createPrivateKey(fs.readFileSync(lm.key)))).toBe(true);
    expect(after.verify(read(pki.caFile).publicKey)).toBe(true);
    expect(after.subjectAltName).toBe(before.cert.subjectAltName);
    expect(after.subjectAltName).toContain('URI:sdmesh://host/host1/lease-manager');
    expect(read(nats.cert).subjectAltName).toBe('URI:sdmesh://nats-server, DNS:localhost, IP Address:127.0.0.1');
    // Replaced by rename (a new inode), key still 0600, no temporary files left behind.
    expect(fs.statSync(lm.cert).ino).not.toBe(before.ino);
    expect(fs.statSync(lm.key).mode & 0o777).toBe(0o600);
    expect(fs.readdirSync(pki.dir).filter((f) => f.startsWith('.'))).toEqual([]);
  });

  it('reissues only the named certificates, and dated ones keep working through the same path', () => {
    const gc = pki.forIdentity({ kind: 'host', host: 'host1', service: 'gc' });
    const lmSerial = read(path.join(pki.dir, 'host1-lease-manager.pem')).serialNumber;
    const gcSerial = read(gc.cert).serialNumber;
    pki.reissue(['host1-gc']);
    expect(read(gc.cert).serialNumber).not.toBe(gcSerial);
    expect(read(path.join(pki.dir, 'host1-lease-manager.pem')).serialNumber).toBe(lmSerial);

    const notAfter = new Date(Date.now() - 86400_000);
    const expired = pki.issue('expired', ['URI:sdmesh://user/admin'], { notBefore: new Date(Date.now() - 2 * 86400_000), notAfter });
    expect(new Date(read(expired.cert).validTo).getTime()).toBeLessThan(Date.now());
    expect(fs.readdirSync(pki.dir).filter((f) => f.startsWith('.') || f.startsWith('ca-db-'))).toEqual([]);
  });

  it('rotates the CA in three steps: new CA trusted next to the old, leaves reissued by it, old CA retired', () => {
    const oldCa = read(pki.caFile);
    const lm = path.join(pki.dir, 'host1-lease-manager.pem');
    pki.beginCaRotation();
    const bundle = fs.readFileSync(pki.caFile, 'utf8');
    expect(bundle.match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
    const newCa = read(path.join(pki.dir, 'ca-next.pem'));
    expect(bundle).toContain(newCa.toString().trim());
    expect(bundle).toContain(oldCa.toString().trim());
    expect(pki.issuedNames()).not.toContain('ca-next');
    expect(read(lm).verify(oldCa.publicKey)).toBe(true);

    pki.reissue(['host1-lease-manager']);
    expect(read(lm).verify(newCa.publicKey)).toBe(true);
    expect(read(lm).verify(oldCa.publicKey)).toBe(false);
    expect(read(lm).issuer).toBe(newCa.subject);

    pki.finishCaRotation();
    expect(read(pki.caFile).fingerprint256).toBe(newCa.fingerprint256);
    expect(fs.readFileSync(pki.caFile, 'utf8').match(/BEGIN CERTIFICATE/g)).toHaveLength(1);
    expect(fs.statSync(path.join(pki.dir, 'ca.key')).mode & 0o777).toBe(0o600);
    // Signed by the new CA from now on, without a rotation under way.
    const gc = pki.reissue(['host1-gc'])[0]!;
    expect(read(gc.cert).verify(newCa.publicKey)).toBe(true);
    expect(() => pki.finishCaRotation()).toThrow(/no CA rotation under way/);
  });
});
