import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { identityUri, type Identity, type TlsFiles } from '@sdmesh/common';

/** A certificate this PKI issued: its files plus the environment a service reads them from. */
export interface IssuedCertificate extends TlsFiles {
  name: string;
}

export interface IssueOptions {
  /** Extra subjectAltName entries (e.g. `DNS:nats.local`). */
  altNames?: string[];
  /** Validity; default 825 days from now. Both as Dates (for expired or not-yet-valid test certificates). */
  notBefore?: Date;
  notAfter?: Date;
}

/**
 * A small certificate authority for the local mesh and the tests, on Debian's openssl: one CA,
 * then one EC P-256 certificate per workload with its sdmesh identity as URI SAN (plus
 * localhost/127.0.0.1 so NATS clients can check the host name). Keys are written 0600 in a
 * 0700 directory. Certificates are issued once and reused on the next start; `reissue` rotates
 * them in place.
 */
export class LocalPki {
  readonly caFile: string;
  private readonly caKeyFile: string;

  constructor(
    readonly dir: string,
    private readonly caName = 'sdmesh local CA',
  ) {
    this.caFile = path.join(dir, 'ca.pem');
    this.caKeyFile = path.join(dir, 'ca.key');
  }

  private get nextCaFile(): string {
    return path.join(this.dir, 'ca-next.pem');
  }
  private get nextCaKeyFile(): string {
    return path.join(this.dir, 'ca-next.key');
  }

  /** The CA that signs new certificates: the next one while a CA rotation is under way. */
  private signer(): { cert: string; key: string } {
    return fs.existsSync(this.nextCaFile) ? { cert: this.nextCaFile, key: this.nextCaKeyFile } : { cert: this.caFile, key: this.caKeyFile };
  }

  /**
   * CA rotation, step 1 of 3: a new CA is created and trusted next to the old one (`ca.pem`
   * becomes the bundle new + old, replaced atomically); certificates issued or reissued from
   * now on are signed by the new CA. Step 2: `reissue()` once every workload trusts the bundle.
   * Step 3: `finishCaRotation()` once every workload presents a certificate of the new CA.
   */
  beginCaRotation(): void {
    this.ensure();
    if (fs.existsSync(this.nextCaFile)) return;
    const tmp = path.join(this.dir, `.ca-next.${process.pid}.${crypto.randomBytes(4).toString('hex')}`);
    try {
      const subject = `/CN=${this.caName} ${new Date().toISOString().slice(0, 19)}`;
      createCa(`${tmp}.key`, `${tmp}.pem`, subject);
      fs.chmodSync(`${tmp}.key`, 0o600);
      fs.writeFileSync(`${tmp}.bundle`, fs.readFileSync(`${tmp}.pem`, 'utf8') + fs.readFileSync(this.caFile, 'utf8'));
      fs.renameSync(`${tmp}.key`, this.nextCaKeyFile);
      fs.renameSync(`${tmp}.pem`, this.nextCaFile);
      fs.renameSync(`${tmp}.bundle`, this.caFile);
    } finally {
      for (const f of ['key', 'pem', 'bundle']) fs.rmSync(`${tmp}.${f}`, { force: true });
    }
  }

  /** CA rotation, step 3: the old CA is no longer trusted; `ca.pem` and `ca.key` are the new CA's. */
  finishCaRotation(): void {
    if (!fs.existsSync(this.nextCaFile)) throw new Error(`${this.dir}: no CA rotation under way (beginCaRotation first)`);
    fs.renameSync(this.nextCaKeyFile, this.caKeyFile);
    fs.renameSync(this.nextCaFile, this.caFile);
  }

  /** Creates the CA if it is not there yet. */
  ensure(): this {
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    fs.chmodSync(this.dir, 0o700);
    if (fs.existsSync(this.caFile) && fs.existsSync(this.caKeyFile)) return this;
    createCa(this.caKeyFile, this.caFile, `/CN=${this.caName}`);
    fs.chmodSync(this.caKeyFile, 0o600);
    return this;
  }

  /** File stem of an identity's certificate: scheduler, host1-metadata-tx, user-admin. */
  static fileName(id: Exclude<Identity, { kind: 'local' } | { kind: 'insecure' }>): string {
    return id.kind === 'scheduler' ? 'scheduler' : id.kind === 'host' ? `${id.host}-${id.service}` : `user-${id.name}`;
  }

  /** The certificate of an sdmesh identity (issued on first use). */
  forIdentity(id: Exclude<Identity, { kind: 'local' } | { kind: 'insecure' }>, opts: IssueOptions = {}): IssuedCertificate {
    return this.issue(LocalPki.fileName(id), [`URI:${identityUri(id)}`, ...(opts.altNames ?? [])], opts);
  }

  /**
   * Issues (or returns the existing) certificate `name` with these subjectAltNames.
   * Certificates with explicit dates, or with `force`, are always issued anew (a new key pair
   * and serial). The new key and certificate are written to temporary files and renamed into
   * place, so a reader never sees a half-written file.
   */
  issue(name: string, altNames: string[], opts: IssueOptions & { force?: boolean } = {}): IssuedCertificate {
    this.ensure();
    const cert = path.join(this.dir, `${name}.pem`);
    const key = path.join(this.dir, `${name}.key`);
    const out: IssuedCertificate = { name, ca: this.caFile, cert, key };
    const dated = opts.notBefore || opts.notAfter;
    if (!dated && !opts.force && fs.existsSync(cert) && fs.existsSync(key)) return out;
    const tmp = `.${name}.${process.pid}.${crypto.randomBytes(4).toString('hex')}`;
    const csr = path.join(this.dir, `${tmp}.csr`);
    const ext = path.join(this.dir, `${tmp}.ext`);
    const newKey = path.join(this.dir, `${tmp}.key`);
    const newCert = path.join(this.dir, `${tmp}.pem`);
    const sans = [...new Set([...altNames, 'DNS:localhost', 'IP:127.0.0.1'])];
    fs.writeFileSync(
      ext,
      [
        `subjectAltName=${sans.join(',')}`,
        'basicConstraints=critical,CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment',
        'extendedKeyUsage=serverAuth,clientAuth',
        '',
      ].join('\n'),
    );
    try {
      openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', newKey, '-out', csr, '-subj', `/CN=${name}`]);
      fs.chmodSync(newKey, 0o600);
      if (dated) this.signDated(csr, ext, newCert, opts.notBefore ?? new Date(), opts.notAfter ?? new Date(Date.now() + 825 * 86400_000));
      else
        openssl([
          'x509',
          '-req',
          '-in',
          csr,
          '-CA',
          this.signer().cert,
          '-CAkey',
          this.signer().key,
          '-set_serial',
          serial(),
          '-days',
          '825',
          '-extfile',
          ext,
          '-out',
          newCert,
        ]);
      // Key first, then certificate: in between, a reader sees a key that does not match the
      // certificate, which FileCertificateProvider ignores until the pair is whole again.
      fs.renameSync(newKey, key);
      fs.renameSync(newCert, cert);
    } finally {
      for (const f of [csr, ext, newKey, newCert]) fs.rmSync(f, { force: true });
    }
    return out;
  }

  /** Names of the certificates issued here (file stems; the CA excluded). */
  issuedNames(): string[] {
    if (!fs.existsSync(this.dir)) return [];
    return fs
      .readdirSync(this.dir)
      .filter(
        (f) =>
          f.endsWith('.pem') &&
          !f.startsWith('.') &&
          ![this.caFile, this.nextCaFile].map((c) => path.basename(c)).includes(f) &&
          fs.existsSync(path.join(this.dir, f.slice(0, -4) + '.key')),
      )
      .map((f) => f.slice(0, -4))
      .sort();
  }

  /**
   * Rotation: issues each named certificate again (default: every one issued here) with the
   * subjectAltNames it has now, a new key pair, a new serial and the default validity, each
   * file replaced atomically in place (what cert-manager does to a mounted Secret).
   */
  reissue(names: string[] = this.issuedNames()): IssuedCertificate[] {
    return names.map((name) => {
      const current = new crypto.X509Certificate(fs.readFileSync(path.join(this.dir, `${name}.pem`)));
      const sans = (current.subjectAltName ?? '')
        .split(/,\s*/)
        .filter(Boolean)
        .map((s) => s.replace(/^IP Address:/, 'IP:'));
      return this.issue(name, sans, { force: true });
    });
  }

  /** `openssl x509` can't back-date; `openssl ca` can (used for expired certificates in tests). */
  private signDated(csr: string, ext: string, cert: string, notBefore: Date, notAfter: Date): void {
    const db = fs.mkdtempSync(path.join(this.dir, 'ca-db-'));
    try {
      fs.writeFileSync(path.join(db, 'index.txt'), '');
      const conf = path.join(db, 'ca.cnf');
      fs.writeFileSync(
        conf,
        [
          '[ca]',
          'default_ca=local',
          '[local]',
          `database=${path.join(db, 'index.txt')}`,
          `new_certs_dir=${db}`,
          `serial=${path.join(db, 'serial')}`,
          'default_md=sha256',
          'policy=any',
          'copy_extensions=none',
          '[any]',
          'commonName=supplied',
          '',
        ].join('\n'),
      );
      const stamp = (d: Date) => d.toISOString().replace(/[-:T]/g, '').slice(0, 14) + 'Z';
      openssl([
        'ca',
        '-batch',
        '-config',
        conf,
        '-in',
        csr,
        '-out',
        cert,
        '-cert',
        this.signer().cert,
        '-keyfile',
        this.signer().key,
        '-startdate',
        stamp(notBefore),
        '-enddate',
        stamp(notAfter),
        '-extfile',
        ext,
        '-rand_serial',
        '-notext',
      ]);
    } finally {
      fs.rmSync(db, { recursive: true, force: true });
    }
  }

  /** The SDMESH_TLS_* variables that point a service or sdmctl at a certificate. */
  static env(c: TlsFiles): NodeJS.ProcessEnv {
    return { SDMESH_TLS_CA: c.ca, SDMESH_TLS_CERT: c.cert, SDMESH_TLS_KEY: c.key };
  }
}

const serial = () =>
  '0x' +
  crypto
    .randomBytes(16)
    .toString('hex')
    .replace(/^[89a-f]/, '1');

/** A self-signed EC P-256 CA, valid 10 years. */
function createCa(keyFile: string, certFile: string, subject: string): void {
  openssl([
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    keyFile,
    '-out',
    certFile,
    '-days',
    '3650',
    '-subj',
    subject,
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
}

function openssl(args: string[]): void {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new Error(`openssl ${args[0]} failed: ${stderr || (err as Error).message}`);
  }
}
