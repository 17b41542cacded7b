import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import bcrypt from 'bcryptjs';
import { eventFilter, EVENT_SUBJECT_PREFIX, natsConnectionOptions, type NodeConnectionOptions } from '@sdmesh/common';
import { LocalPki } from './pki';
import { freePort, startProcess, waitForPort, type ManagedProcess } from './processes';

/**
 * What a NATS user may do. `scheduler`: everything JetStream (creates the event stream and the
 * KV buckets, the only writer of the KV) and any event; `host`: publish its own host's events
 * only; `reader`: subscribe to events and read (not write) the scheduler's KV buckets.
 */
export type NatsRole = 'scheduler' | 'host' | 'reader';

export interface NatsServerOptions {
  /** Host names: each gets a user of the same name that may publish only that host's events. */
  hosts?: readonly string[];
  /** Reader users (default: `sdmctl`). */
  readers?: readonly string[];
  /** Where the server certificate comes from (default: a LocalPki of its own in <dir>/pki). */
  pki?: LocalPki;
  /** Prefix of the scheduler's KV buckets that readers may read (the scheduler's --kv-prefix). */
  kvPrefix?: string;
  /** Plaintext and anonymous, everyone may do everything: only for `--insecure` meshes. */
  insecure?: boolean;
}

/** The scheduler's KV buckets (services/scheduler: <prefix>_<name>). */
const KV_BUCKETS = ['operations', 'locks', 'domains', 'hosts'] as const;
/** bcrypt cost of the password hashes in the server config (each connect pays one check). */
const BCRYPT_ROUNDS = 10;

/**
 * A real nats-server (Debian's 2.9) with JetStream, on a free loopback port. By default it
 * serves TLS only (a certificate for `sdmesh://nats-server`, localhost and 127.0.0.1) and
 * knows one user per role and host, with subject permissions; anonymous clients are refused.
 * Passwords are random, made on the first start and kept 0600 in <dir>/credentials/; the
 * generated config (<dir>/nats-server.conf) holds only their bcrypt hashes.
 */
export class NatsServer {
  private proc?: ManagedProcess;
  port = 0;
  readonly users = new Map<string, NatsRole>();
  readonly pki: LocalPki;
  readonly configFile: string;
  readonly credentialsDir: string;

  constructor(
    private readonly dir: string,
    private readonly opts: NatsServerOptions = {},
  ) {
    this.pki = opts.pki ?? new LocalPki(path.join(dir, 'pki'));
    this.configFile = path.join(dir, 'nats-server.conf');
    this.credentialsDir = path.join(dir, 'credentials');
    this.users.set('scheduler', 'scheduler');
    for (const h of opts.hosts ?? []) this.addUser(h, 'host');
    for (const r of opts.readers ?? ['sdmctl']) this.addUser(r, 'reader');
  }

  get insecure(): boolean {
    return !!this.opts.insecure;
  }

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  /** The CA file clients verify the server with. */
  get caFile(): string {
    return this.pki.caFile;
  }

  /** Declares a user (before start, or call reload() after). */
  addUser(name: string, role: NatsRole): void {
    if (!/^[A-Za-z0-9_-]+$/.test(name)) throw new Error(`NATS user "${name}": only letters, digits, _ and - (a host name is also a subject token)`);
    const known = this.users.get(name);
    if (known && known !== role) throw new Error(`NATS user "${name}" is already a ${known}`);
    this.users.set(name, role);
  }

  /** File holding a user's password (made on first use, 0600). */
  passwordFile(user: string): string {
    if (!this.users.has(user)) throw new Error(`no NATS user "${user}" (known: ${[...this.users.keys()].join(', ')})`);
    const file = path.join(this.credentialsDir, `${user}.password`);
    if (!fs.existsSync(file)) this.writePassword(file);
    return file;
  }

  /**
   * The environment that points an sdmesh service or sdmctl at this server as `user`. The CA
   * (SDMESH_TLS_CA) is not in it: it is the mesh CA the workload's TLS env already names (pass
   * the mesh's LocalPki as `pki`); give `caFile` yourself where there is no such env.
   */
  clientEnv(user: string): NodeJS.ProcessEnv {
    if (this.insecure) return { SDMESH_NATS_URL: this.url };
    return { SDMESH_NATS_URL: this.url, SDMESH_NATS_USER: user, SDMESH_NATS_PASSWORD_FILE: this.passwordFile(user) };
  }

  /** nats.js connection options as `user` (test watchers, tools). */
  connectOptions(user: string): NodeConnectionOptions {
    if (this.insecure) return natsConnectionOptions(this.url);
    return natsConnectionOptions(this.url, { user, passwordFile: this.passwordFile(user), caFile: this.caFile });
  }

  async start(): Promise<this> {
    if (!this.port) this.port = await freePort();
    fs.mkdirSync(this.dir, { recursive: true });
    this.writeConfig();
    this.proc = startProcess('nats-server', process.env.SDMESH_NATS_SERVER_BIN ?? 'nats-server', ['-c', this.configFile], {
      logFile: path.join(this.dir, 'nats-server.log'),
    });
    await Promise.race([
      waitForPort(this.port),
      this.proc.exited.then((code) => {
        throw new Error(`nats-server exited (${code}); see ${path.join(this.dir, 'nats-server.log')}`);
      }),
    ]);
    return this;
  }

  /**
   * Gives `user` a new random password: the file first, then the server config, then a
   * config reload (SIGHUP). The server drops connections still using the old password; the
   * sdmesh clients reconnect and read the new one from the file.
   */
  rotatePassword(user: string): void {
    this.writePassword(this.passwordFile(user));
    this.reload();
  }

  /** Rewrites the config (users, permissions) and has the running server reload it. */
  reload(): void {
    this.writeConfig();
    if (this.proc?.running()) process.kill(this.proc.pid, 'SIGHUP');
  }

  get pid(): number {
    return this.proc?.pid ?? -1;
  }

  running(): boolean {
    return !!this.proc?.running();
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await this.proc?.stop(signal);
  }

  /**
   * Makes nats-server read its config again (SIGHUP), which includes its certificate files:
   * after a rotation, new client connections get the new certificate; existing ones stay.
   */
  reloadTls(): void {
    if (!this.proc?.running()) throw new Error('nats-server is not running');
    this.proc.child.kill('SIGHUP');
  }

  /** Stops and starts again on the same port with the same store. */
  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  private writePassword(file: string): void {
    fs.mkdirSync(this.credentialsDir, { recursive: true, mode: 0o700 });
    fs.chmodSync(this.credentialsDir, 0o700);
    const tmp = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, crypto.randomBytes(24).toString('base64url') + '\n', { mode: 0o600 });
    fs.renameSync(tmp, file);
  }

  /** The nats-server config (2.9 syntax; its parser takes JSON). */
  private writeConfig(): void {
    const config: Record<string, unknown> = {
      listen: `127.0.0.1:${this.port}`,
      jetstream: { store_dir: path.join(this.dir, 'jetstream') },
    };
    if (!this.insecure) {
      const cert = this.pki.issue('nats-server', ['URI:sdmesh://nats-server']);
      config.tls = { cert_file: cert.cert, key_file: cert.key, timeout: 5 };
      config.authorization = {
        users: [...this.users].map(([user, role]) => ({
          user,
          password: bcrypt.hashSync(fs.readFileSync(this.passwordFile(user), 'utf8').trim(), BCRYPT_ROUNDS),
          permissions: natsPermissions(role, user, this.opts.kvPrefix ?? 'sdmesh'),
        })),
      };
    }
    const tmp = `${this.configFile}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(config, null, 2) + '\n', { mode: 0o600 });
    fs.renameSync(tmp, this.configFile);
  }
}

/**
 * Subject permissions of a role, in nats-server's config form. Allow lists: anything not
 * listed is refused. An empty allow list would mean "everything", hence the explicit deny.
 */
export function natsPermissions(role: NatsRole, user: string, kvPrefix = 'sdmesh'): { publish: object; subscribe: object } {
  const events = `${EVENT_SUBJECT_PREFIX}.>`;
  switch (role) {
    case 'scheduler':
      return {
        // JetStream API (streams, KV buckets, consumers), KV writes, acks and flow control, events.
        publish: { allow: ['$JS.API.>', '$KV.>', '$JS.ACK.>', '$JS.FC.>', events] },
        subscribe: { allow: ['_INBOX.>', events] },
      };
    case 'host':
      return { publish: { allow: [eventFilter('*', '*', user)] }, subscribe: { deny: ['>'] } };
    case 'reader': {
      const streams = KV_BUCKETS.map((b) => `KV_${kvPrefix}_${b}`);
      return {
        // Reads only: stream info and single-message gets of the KV buckets. No consumers: a
        // push consumer's deliver subject could replay old events onto live event subjects.
        publish: {
          allow: [
            '$JS.API.INFO',
            ...streams.flatMap((s) => [`$JS.API.STREAM.INFO.${s}`, `$JS.API.DIRECT.GET.${s}`, `$JS.API.DIRECT.GET.${s}.>`, `$JS.API.STREAM.MSG.GET.${s}`]),
          ],
        },
        subscribe: { allow: ['_INBOX.>', events] },
      };
    }
  }
}
