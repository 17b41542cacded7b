import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import bcrypt from 'bcryptjs';
import { eventFilter, EVENT_SUBJECT_PREFIX, natsConnectionOptions, type NodeConnectionOptions } from '@sdmesh/common';
import { LocalPki } from './pki';
import { freePort, startProcess, waitFor, waitForPort, type ManagedProcess } from './processes';

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
  /** Where the users' passwords are kept (default <dir>/credentials; the nodes of a cluster share one). */
  credentialsDir?: string;
  /** This server as one node of a NATS cluster (NatsCluster sets it). */
  cluster?: NatsClusterNode;
}

/** One node's place in a NATS cluster: its route port, the other nodes' route ports. */
export interface NatsClusterNode {
  /** Cluster name (the same on every node). */
  name: string;
  /** Server name of this node (unique; JetStream places replicas by it). */
  serverName: string;
  /** Client port of this node (fixed up front, so it restarts where clients look for it). */
  port: number;
  /** Route port of this node. */
  routePort: number;
  /** Route ports of every node of the cluster (this one's is skipped). */
  routePorts: readonly number[];
}

/** The user the cluster's nodes authenticate their routes with (not a client user). */
const ROUTE_USER = 'route';

/** The scheduler's KV buckets (services/scheduler: <prefix>_<name>). */
const KV_BUCKETS = ['operations', 'locks', 'domains', 'hosts', 'attachments'] as const;
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
    this.credentialsDir = opts.credentialsDir ?? path.join(dir, 'credentials');
    if (opts.cluster) this.port = opts.cluster.port;
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

  /** The server certificate (issued on first use; also the client certificate of its routes). */
  private tlsFiles(): { cert_file: string; key_file: string } {
    const cert = this.pki.issue('nats-server', ['URI:sdmesh://nats-server']);
    return { cert_file: cert.cert, key_file: cert.key };
  }

  /** File holding the routes' password (shared by the nodes of a cluster, 0600). */
  private routePasswordFile(): string {
    const file = path.join(this.credentialsDir, `${ROUTE_USER}.route-password`);
    if (!fs.existsSync(file)) this.writePassword(file);
    return file;
  }

  /** The nats-server config (2.9 syntax; its parser takes JSON). */
  private writeConfig(): void {
    const config: Record<string, unknown> = {
      listen: `127.0.0.1:${this.port}`,
      jetstream: { store_dir: path.join(this.dir, 'jetstream') },
    };
    const cluster = this.opts.cluster;
    if (cluster) {
      config.server_name = cluster.serverName;
      const routePassword = this.insecure ? '' : fs.readFileSync(this.routePasswordFile(), 'utf8').trim();
      const auth = this.insecure ? '' : `${ROUTE_USER}:${encodeURIComponent(routePassword)}@`;
      config.cluster = {
        name: cluster.name,
        listen: `127.0.0.1:${cluster.routePort}`,
        routes: cluster.routePorts.filter((p) => p !== cluster.routePort).map((p) => `nats-route://${auth}127.0.0.1:${p}`),
        // Routes are authenticated twice, as between the nodes of a real cluster: mutual TLS
        // (each node presents its certificate, signed by the mesh CA) and the route password.
        ...(this.insecure
          ? {}
          : {
              authorization: { user: ROUTE_USER, password: bcrypt.hashSync(routePassword, BCRYPT_ROUNDS), timeout: 5 },
              tls: { ...this.tlsFiles(), ca_file: this.pki.caFile, verify: true, timeout: 5 },
            }),
      };
    }
    if (!this.insecure) {
      config.tls = { ...this.tlsFiles(), timeout: 5 };
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
 * A NATS cluster of real nats-servers on loopback (3 nodes by default), JetStream on every node,
 * routes between them over mutual TLS with a route password, the same users and permissions on
 * every node as a single NatsServer. Clients get every node's URL; nodes can be killed and
 * started again one at a time (same ports, same store), as in a failing real deployment.
 */
export class NatsCluster {
  readonly nodes: NatsServer[] = [];
  readonly pki: LocalPki;

  constructor(
    private readonly dir: string,
    private readonly opts: NatsServerOptions & { nodes?: number; name?: string } = {},
  ) {
    this.pki = opts.pki ?? new LocalPki(path.join(dir, 'pki'));
  }

  get insecure(): boolean {
    return !!this.opts.insecure;
  }

  /** Every node's client URL, comma-separated (what SDMESH_NATS_URL takes). */
  get url(): string {
    return this.nodes.map((n) => n.url).join(',');
  }

  get caFile(): string {
    return this.pki.caFile;
  }

  private get first(): NatsServer {
    const node = this.nodes[0];
    if (!node) throw new Error('the NATS cluster is not started');
    return node;
  }

  addUser(name: string, role: NatsRole): void {
    for (const n of this.nodes) n.addUser(name, role);
  }

  passwordFile(user: string): string {
    return this.first.passwordFile(user);
  }

  clientEnv(user: string): NodeJS.ProcessEnv {
    return { ...this.first.clientEnv(user), SDMESH_NATS_URL: this.url };
  }

  connectOptions(user: string): NodeConnectionOptions {
    return { ...this.first.connectOptions(user), servers: this.nodes.map((n) => n.url) };
  }

  async start(): Promise<this> {
    if (!this.nodes.length) {
      const count = this.opts.nodes ?? 3;
      const ports = await Promise.all(Array.from({ length: count * 2 }, () => freePort()));
      const routePorts = ports.slice(count);
      for (let i = 0; i < count; i++) {
        const serverName = `nats-${i + 1}`;
        this.nodes.push(
          new NatsServer(path.join(this.dir, serverName), {
            ...this.opts,
            pki: this.pki,
            credentialsDir: path.join(this.dir, 'credentials'),
            cluster: { name: this.opts.name ?? 'sdmesh', serverName, port: ports[i]!, routePort: routePorts[i]!, routePorts },
          }),
        );
      }
    }
    await Promise.all(this.nodes.filter((n) => !n.running()).map((n) => n.start()));
    await this.waitForJetStream();
    return this;
  }

  /**
   * Waits until the cluster answers JetStream requests (its nodes have met over their routes
   * and elected a metadata leader), so that the first scheduler can create its buckets.
   */
  async waitForJetStream(timeoutMs = 60_000): Promise<void> {
    const nc = await connect({ ...this.connectOptions('scheduler'), maxReconnectAttempts: -1, reconnectTimeWait: 250 });
    try {
      // jetstreamManager asks for the account info itself, which fails until there is a leader.
      await waitFor('the NATS cluster to elect a JetStream leader', () => jetstreamManager(nc).then(() => true), timeoutMs, 250);
    } finally {
      await nc.close();
    }
  }

  /** Kills (default SIGKILL) node i; its port and store stay for startNode(i). */
  async killNode(i: number, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    await this.node(i).stop(signal);
  }

  /** Starts node i again (same ports, same JetStream store): it rejoins and catches up. */
  async startNode(i: number): Promise<void> {
    await this.node(i).start();
  }

  node(i: number): NatsServer {
    const node = this.nodes[i];
    if (!node) throw new Error(`no NATS node ${i} (the cluster has ${this.nodes.length})`);
    return node;
  }

  running(): boolean {
    return this.nodes.some((n) => n.running());
  }

  reload(): void {
    for (const n of this.nodes) n.reload();
  }

  reloadTls(): void {
    for (const n of this.nodes) if (n.running()) n.reloadTls();
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    await Promise.all(this.nodes.map((n) => n.stop(signal)));
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
