import crypto from 'node:crypto';
import fs from 'node:fs';
import type { PeerCertificate } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { ConfigError } from './config';
import { describeIdentity, identityFromSubjectAltName, type Identity } from './identity';
import type { Logger } from './logger';

type CaListener = Parameters<grpc.experimental.CertificateProvider['addCaCertificateListener']>[0];
type IdentityListener = Parameters<grpc.experimental.CertificateProvider['addIdentityCertificateListener']>[0];

/** PEM files of one workload: the CA bundle it trusts, its certificate chain and key. */
export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/**
 * Certificates read from files and re-read when they change, so cert-manager can rotate a
 * mounted Secret in place without a restart. A set whose key does not match its certificate
 * (a rotation caught half-written) is ignored until it is whole; the last good set stays in use.
 */
export class FileCertificateProvider implements grpc.experimental.CertificateProvider {
  private ca?: Buffer;
  private identity?: { certificate: Buffer; privateKey: Buffer };
  private stamp = '';
  private timer?: NodeJS.Timeout;
  private readonly caListeners = new Set<CaListener>();
  private readonly identityListeners = new Set<IdentityListener>();

  constructor(
    readonly files: TlsFiles,
    private readonly reloadMs: number,
    private readonly log?: Logger,
  ) {
    this.reload(true);
  }

  /** Reads the files if they changed; true when a new, consistent set was taken. */
  reload(initial = false): boolean {
    let stamp: string;
    try {
      stamp = [this.files.ca, this.files.cert, this.files.key]
        .map((f) => {
          const st = fs.statSync(f);
          return `${st.ino}:${st.size}:${st.mtimeMs}`;
        })
        .join('|');
    } catch (err) {
      if (initial) throw new ConfigError(`TLS files: ${(err as Error).message}`);
      this.log?.warn({ err: String(err) }, 'TLS files unreadable; keeping the certificates in use');
      return false;
    }
    if (stamp === this.stamp) return false;
    try {
      const ca = fs.readFileSync(this.files.ca);
      const certificate = fs.readFileSync(this.files.cert);
      const privateKey = fs.readFileSync(this.files.key);
      const leaf = new crypto.X509Certificate(certificate);
      if (!leaf.checkPrivateKey(crypto.createPrivateKey(privateKey)))
        throw new Error(`the key in ${this.files.key} does not belong to the certificate in ${this.files.cert}`);
      new crypto.X509Certificate(ca); // parses the first CA certificate: a clear error for a wrong file
      this.ca = ca;
      this.identity = { certificate, privateKey };
      this.stamp = stamp;
    } catch (err) {
      if (initial) throw new ConfigError(`TLS files: ${(err as Error).message}`);
      this.log?.warn({ err: String(err) }, 'new TLS files are not usable (yet); keeping the certificates in use');
      return false;
    }
    if (!initial) {
      this.log?.info({ cert: this.files.cert }, 'TLS certificates reloaded');
      for (const l of this.caListeners) l({ caCertificate: this.ca });
      for (const l of this.identityListeners) l(this.identity);
    }
    return true;
  }

  private watch(): void {
    if (this.timer || this.reloadMs <= 0) return;
    this.timer = setInterval(() => this.reload(), this.reloadMs);
    this.timer.unref();
  }

  private unwatch(): void {
    if (this.caListeners.size || this.identityListeners.size) return;
    clearInterval(this.timer);
    this.timer = undefined;
  }

  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener);
    this.watch();
    // Asynchronously, as grpc-js expects: it registers its watcher after adding the listener.
    process.nextTick(() => this.caListeners.has(listener) && listener({ caCertificate: this.ca! }));
  }
  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener);
    this.unwatch();
  }
  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener);
    this.watch();
    process.nextTick(() => this.identityListeners.has(listener) && listener(this.identity!));
  }
  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener);
    this.unwatch();
  }
}

/** The identity a peer certificate names, if the TLS layer verified it against our CA. */
export function identityOfCertificate(cert: PeerCertificate | undefined): Identity | undefined {
  return cert ? identityFromSubjectAltName(cert.subjectaltname) : undefined;
}

/** Which server identities a client accepts: one exact identity, or any sdmesh identity. */
export type ServerIdentityCheck = (id: Identity) => boolean;

export const sameIdentity =
  (want: Identity): ServerIdentityCheck =>
  (id) =>
    describeIdentity(id) === describeIdentity(want);

/**
 * The transport security of one workload: mTLS from its files, or plaintext when it was
 * started with --insecure (an explicit opt-out that the service logs loudly at start).
 *
 * Servers ask every client for a certificate but do not fail the handshake without one,
 * so that a caller with no or an untrusted certificate gets a clear UNAUTHENTICATED status
 * instead of a reset connection; the authorization layer refuses every such call.
 * Clients check the server's certificate against the CA and, where they know whom they are
 * calling, its sdmesh identity instead of the host name (pods move between addresses).
 */
export class MeshTls {
  private provider?: FileCertificateProvider;

  private constructor(
    readonly files: TlsFiles | undefined,
    reloadMs: number,
    log?: Logger,
  ) {
    if (files) this.provider = new FileCertificateProvider(files, reloadMs, log);
  }

  static insecureMode(): MeshTls {
    return new MeshTls(undefined, 0);
  }

  static fromFiles(files: TlsFiles, opts: { reloadMs?: number; log?: Logger } = {}): MeshTls {
    return new MeshTls(files, opts.reloadMs ?? 10_000, opts.log);
  }

  /** From the common options; refuses to start without certificates unless --insecure. */
  static fromConfig(config: { tlsCa: string; tlsCert: string; tlsKey: string; tlsReloadMs: number; insecure: boolean }, log?: Logger): MeshTls {
    if (config.insecure) return MeshTls.insecureMode();
    const missing = (['tlsCa', 'tlsCert', 'tlsKey'] as const).filter((k) => !config[k]);
    if (missing.length) {
      throw new ConfigError(
        `mTLS is required: give --tls-ca, --tls-cert and --tls-key (SDMESH_TLS_CA/_CERT/_KEY), or --insecure to run without authentication (missing: ${missing
          .map((k) => '--' + k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase()))
          .join(', ')})`,
      );
    }
    return MeshTls.fromFiles({ ca: config.tlsCa, cert: config.tlsCert, key: config.tlsKey }, { reloadMs: config.tlsReloadMs, log });
  }

  get insecure(): boolean {
    return !this.provider;
  }

  serverCredentials(): grpc.ServerCredentials {
    if (!this.provider) return grpc.ServerCredentials.createInsecure();
    return grpc.experimental.createCertificateProviderServerCredentials(this.provider, this.provider, false);
  }

  channelCredentials(accept?: ServerIdentityCheck): grpc.ChannelCredentials {
    if (!this.provider) return grpc.credentials.createInsecure();
    return grpc.experimental.createCertificateProviderChannelCredentials(this.provider, this.provider, {
      checkServerIdentity: serverIdentityCheck(accept),
    });
  }
}

/** Node's checkServerIdentity hook: the sdmesh identity in the certificate instead of the host name. */
export function serverIdentityCheck(accept?: ServerIdentityCheck): (hostname: string, cert: PeerCertificate) => Error | undefined {
  return (hostname, cert) => {
    const id = identityOfCertificate(cert);
    if (!id) return new Error(`the server at ${hostname} presented a certificate without an sdmesh identity (URI SAN sdmesh://...)`);
    if (accept && !accept(id)) return new Error(`the server at ${hostname} is ${describeIdentity(id)}, not the service this client meant to call`);
    return undefined;
  };
}
