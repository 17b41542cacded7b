/**
 * The open image transfers of this data-mover: per ticket, the export worker (its own process,
 * holding the chain's leases and running qemu-nbd) and the NBD connections the HTTPS endpoint
 * reads and writes through. The control plane opens and closes transfers through the data-mover's
 * Open/Get/CloseTransfer RPCs; clients use the URL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  BASE_ALLOCATION,
  dirtyBitmapContext,
  fail,
  invalidArgument,
  NbdClient,
  notFound,
  Reason,
  SdmeshError,
  validateId,
  type Logger,
  type TlsFiles,
} from '@sdmesh/common';
import type { Registry } from 'prom-client';
import type { ExportConfig, ExportToService, ServiceToExport } from './export-protocol';
import { TransferMetrics } from './metrics';
import { TransferServer } from './server';
import { TICKET_ID, type TransferRegistry, type TransferStats, type TransferTicket } from './tickets';

export const EXPORT_WORKER_SCRIPT = path.join(__dirname, 'export-worker.js');
/** How long a closed transfer's ticket is still known (its requests get 409, not 404). */
const CLOSED_RETENTION_MS = 10 * 60_000;
/** Idle NBD connections kept per transfer (one per concurrent HTTP request is opened as needed). */
const MAX_IDLE_CONNECTIONS = 4;
const OPEN_TIMEOUT_MS = 180_000;
/** How long close() lets requests in flight finish before it cuts their connections. */
const CLOSE_GRACE_MS = 10_000;

export interface TransferRegistryOptions {
  hostName: string;
  leaseManagerAddress: string;
  logLevel: string;
  storageGroupId?: number;
  log: Logger;
  registry: Registry;
  /** The mesh's TLS files; undefined = --insecure (plain HTTP, no identity checks). */
  tls: TlsFiles | undefined;
  tlsReloadMs?: number;
  port: number;
  bindHost: string;
  /** The host name put in URLs (default: the host name). */
  advertiseHost?: string;
  sharedLeaseWaitMs?: number;
}

/** One transfer as the endpoint serves it. */
export class OpenTransfer {
  stats: TransferStats;
  /** Requests in flight: close() waits for them. */
  inFlight = 0;
  /** The HTTP exchanges of this transfer still open: close() cuts those that outlast its grace. */
  readonly exchanges = new Set<{ destroy(): void }>();
  private idle: NbdClient[] = [];
  /** Everyone waiting in drain(): all are woken when the last request ends. */
  private drainWaiters: Array<() => void> = [];
  /** The close in progress (a retried CloseTransfer waits for the same one). */
  closed?: Promise<TransferStats>;
  closing = false;
  closedAt?: number;
  /** The export's NBD socket once it serves. */
  socket = '';

  constructor(
    readonly ticket: TransferTicket,
    readonly runDir: string,
    readonly worker: ChildProcess,
  ) {
    this.stats = { bytesRead: 0, bytesWritten: 0, lastActivityAt: Date.now(), active: false };
  }

  /** The metadata contexts a connection negotiates: allocation always, the ticket's bitmap for a download. */
  get contexts(): string[] {
    return this.ticket.bitmap ? [BASE_ALLOCATION, dirtyBitmapContext(this.ticket.bitmap)] : [BASE_ALLOCATION];
  }

  /** Runs fn with an NBD connection of the export (pooled); counts as in flight for close(). */
  async withNbd<T>(fn: (nbd: NbdClient) => Promise<T>): Promise<T> {
    this.inFlight++;
    let nbd: NbdClient | undefined;
    try {
      nbd = this.idle.pop() ?? (await NbdClient.connect(this.socket, { metaContexts: this.contexts }));
      const result = await fn(nbd);
      if (this.idle.length < MAX_IDLE_CONNECTIONS && !this.closing) this.idle.push(nbd);
      else await nbd.close().catch(() => undefined);
      nbd = undefined;
      return result;
    } finally {
      // A connection that failed mid-request is not reused.
      if (nbd) await nbd.close().catch(() => undefined);
      this.inFlight--;
      if (this.inFlight === 0) {
        const waiters = this.drainWaiters;
        this.drainWaiters = [];
        for (const wake of waiters) wake();
      }
    }
  }

  /** Resolves when no request is in flight. */
  async drain(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  async closeConnections(): Promise<void> {
    const idle = this.idle;
    this.idle = [];
    await Promise.all(idle.map((c) => c.close().catch(() => undefined)));
  }

  /** Activity moves the expiry forward by the idle timeout, never past maxExpiresAt. */
  touch(now = Date.now()): void {
    this.stats.lastActivityAt = now;
    const next = now + this.ticket.idleTimeoutMs;
    this.ticket.expiresAt = Math.max(this.ticket.expiresAt, this.ticket.maxExpiresAt ? Math.min(next, this.ticket.maxExpiresAt) : next);
  }
}

/** Checks a ticket before anything is started for it (INVALID_ARGUMENT: the control plane sent a bad one). */
export function checkTicket(t: TransferTicket): void {
  if (!TICKET_ID.test(t.ticketId)) throw invalidArgument('the ticket id must be 32 random bytes, base64url (43 characters)');
  if (t.direction !== 'upload' && t.direction !== 'download') throw invalidArgument(`direction must be upload or download, not "${String(t.direction)}"`);
  if (t.format !== 'raw' && t.format !== 'qcow2') throw invalidArgument(`format must be raw or qcow2, not "${String(t.format)}"`);
  if (!t.volumeIds.length) throw invalidArgument('the ticket names no volume');
  validateId('image id', t.imageId);
  validateId('domain id', t.domainId);
  for (const v of t.volumeIds) validateId('volume id', v);
  if (!Number.isSafeInteger(t.size) || t.size <= 0) throw invalidArgument(`size must be a positive number of bytes, not ${t.size}`);
  if (!Number.isSafeInteger(t.generation) || t.generation < 0) throw invalidArgument(`generation must be >= 0, not ${t.generation}`);
  if (!Number.isSafeInteger(t.idleTimeoutMs) || t.idleTimeoutMs <= 0) throw invalidArgument('idleTimeoutMs must be positive');
  if (t.bitmap !== undefined && (t.direction !== 'download' || !/^[A-Za-z0-9._-]{1,1023}$/.test(t.bitmap))) {
    throw invalidArgument('a bitmap is only for downloads and must be a valid bitmap name');
  }
}

export class ImageTransfers implements TransferRegistry {
  private readonly transfers = new Map<string, OpenTransfer>();
  readonly metrics: TransferMetrics;
  private server!: TransferServer;
  private readonly runRoot: string;
  private sweeper?: NodeJS.Timeout;

  private constructor(private readonly opts: TransferRegistryOptions) {
    this.metrics = new TransferMetrics(opts.registry);
    this.runRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmesh-transfers-'));
    fs.chmodSync(this.runRoot, 0o700);
  }

  static async start(opts: TransferRegistryOptions): Promise<ImageTransfers> {
    const registry = new ImageTransfers(opts);
    registry.server = await TransferServer.listen({
      port: opts.port,
      host: opts.bindHost,
      tls: opts.tls,
      tlsReloadMs: opts.tlsReloadMs ?? 10_000,
      lookup: (id) => registry.transfers.get(id),
      metrics: registry.metrics,
      log: opts.log,
    });
    registry.sweeper = setInterval(() => registry.sweep(), 60_000);
    registry.sweeper.unref();
    opts.log.info({ url: registry.baseUrl }, 'image transfer endpoint listening');
    return registry;
  }

  get port(): number {
    return this.server.port;
  }

  get baseUrl(): string {
    return `${this.opts.tls ? 'https' : 'http'}://${this.opts.advertiseHost ?? this.opts.hostName}:${this.server.port}/images/`;
  }

  async open(t: TransferTicket): Promise<{ url: string }> {
    checkTicket(t);
    const url = this.baseUrl + t.ticketId;
    const existing = this.transfers.get(t.ticketId);
    if (existing) {
      // The control plane retries an open it lost the answer of: the same transfer is the same answer.
      if (existing.ticket.transferId !== t.transferId) throw fail(Reason.ALREADY_EXISTS, 'a transfer with this ticket id is already open');
      if (existing.stats.failed) throw fail(Reason.TRANSFER_FAILED, existing.stats.failed);
      return { url };
    }
    const runDir = fs.mkdtempSync(path.join(this.runRoot, 't-'));
    const worker = spawn('setpriv', ['--pdeathsig', 'KILL', process.execPath, EXPORT_WORKER_SCRIPT], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      env: process.env,
    });
    const entry = new OpenTransfer({ ...t }, runDir, worker);
    this.transfers.set(t.ticketId, entry);
    const config: ExportConfig = {
      leaseManagerAddress: this.opts.leaseManagerAddress,
      hostName: this.opts.hostName,
      logLevel: this.opts.logLevel,
      storageGroupId: this.opts.storageGroupId,
      runDir,
      sharedLeaseWaitMs: this.opts.sharedLeaseWaitMs ?? 120_000,
    };
    const ready = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(fail(Reason.TRANSFER_FAILED, `the export did not open within ${OPEN_TIMEOUT_MS / 1000} s`)), OPEN_TIMEOUT_MS);
      worker.on('message', (msg: ExportToService) => {
        if (msg.type === 'ready') {
          clearTimeout(timer);
          entry.socket = msg.socket;
          entry.stats.active = true;
          entry.touch();
          this.metrics.active.inc({ direction: t.direction });
          resolve();
        } else if (msg.type === 'failed') {
          clearTimeout(timer);
          const err = new SdmeshError(msg.error.code, msg.error.message, msg.error.reason as Reason);
          this.markFailed(entry, err.message);
          reject(err);
        }
      });
      worker.once('exit', (code, signal) => {
        clearTimeout(timer);
        if (!entry.closing) this.markFailed(entry, `the export process exited (${code ?? signal}) while the transfer was open`);
        reject(fail(Reason.TRANSFER_FAILED, entry.stats.failed ?? 'the export process exited'));
      });
      worker.once('error', (err) => reject(fail(Reason.TRANSFER_FAILED, `cannot start the export process: ${err.message}`)));
    });
    worker.send({ type: 'open', ticket: entry.ticket, config } satisfies ServiceToExport);
    try {
      await ready;
    } catch (err) {
      await this.stopWorker(entry);
      throw err;
    }
    this.opts.log.info({ transfer: t.transferId, direction: t.direction, disk: t.diskId, pid: worker.pid }, 'image transfer open');
    return { url };
  }

  private markFailed(entry: OpenTransfer, why: string): void {
    if (entry.stats.active) this.metrics.active.dec({ direction: entry.ticket.direction });
    entry.stats.active = false;
    entry.stats.failed ??= why;
    entry.closing = true;
    entry.closedAt ??= Date.now();
    this.opts.log.warn({ transfer: entry.ticket.transferId, why }, 'image transfer failed');
  }

  async close(ticketId: string, opts: { flush: boolean }): Promise<TransferStats> {
    const entry = this.transfers.get(ticketId);
    if (!entry) throw notFound('no open transfer with this ticket on this host', Reason.TRANSFER_NOT_FOUND);
    // A retried close (its answer lost) waits for the first one and gets the same answer.
    entry.closed ??= this.closeEntry(entry, opts);
    return entry.closed;
  }

  private async closeEntry(entry: OpenTransfer, opts: { flush: boolean }): Promise<TransferStats> {
    if (entry.closedAt !== undefined && !entry.stats.active) {
      await this.stopWorker(entry);
      return { ...entry.stats };
    }
    entry.closing = true;
    // Requests in flight finish; a client that stalls (stops reading a GET, stops sending a PUT) is
    // cut after the grace, so a finalize or cancel never waits on it.
    const grace = new Promise<'late'>((resolve) => setTimeout(() => resolve('late'), CLOSE_GRACE_MS).unref());
    if ((await Promise.race([entry.drain().then(() => 'drained' as const), grace])) === 'late') {
      this.opts.log.warn({ transfer: entry.ticket.transferId, requests: entry.inFlight }, 'requests still running at close: cut');
      for (const x of entry.exchanges) x.destroy();
      await entry.drain();
    }
    if (opts.flush && entry.ticket.direction === 'upload' && !entry.stats.failed) {
      await entry.withNbd((nbd) => nbd.flush()).catch((err: unknown) => this.markFailed(entry, `flush failed: ${String(err)}`));
    }
    await entry.closeConnections();
    await this.stopWorker(entry);
    if (entry.stats.active) this.metrics.active.dec({ direction: entry.ticket.direction });
    entry.stats.active = false;
    entry.closedAt = Date.now();
    this.opts.log.info({ transfer: entry.ticket.transferId, ...entry.stats }, 'image transfer closed');
    return { ...entry.stats };
  }

  /** Asks the worker to stop qemu-nbd and release its leases; waits for its exit. */
  private async stopWorker(entry: OpenTransfer): Promise<void> {
    const w = entry.worker;
    if (w.exitCode === null && w.signalCode === null) {
      const exited = new Promise<void>((resolve) => w.once('exit', () => resolve()));
      const closed = new Promise<void>((resolve) =>
        w.on('message', (msg: ExportToService) => {
          if (msg.type === 'closed') resolve();
          if (msg.type === 'failed') {
            this.markFailed(entry, msg.error.message);
            resolve();
          }
        }),
      );
      if (w.connected) w.send({ type: 'close' } satisfies ServiceToExport);
      // The worker gives qemu-nbd 30 s to stop; beyond that it is killed (sanlock frees the leases).
      const kill = setTimeout(() => w.kill('SIGKILL'), 45_000);
      await Promise.race([exited, closed.then(() => exited)]);
      clearTimeout(kill);
    }
    fs.rmSync(entry.runDir, { recursive: true, force: true });
  }

  stats(ticketId: string): TransferStats | undefined {
    const e = this.transfers.get(ticketId);
    return e ? { ...e.stats } : undefined;
  }

  /** Forgets transfers closed long ago. */
  private sweep(): void {
    const now = Date.now();
    for (const [id, e] of this.transfers) if (e.closedAt !== undefined && now - e.closedAt > CLOSED_RETENTION_MS) this.transfers.delete(id);
  }

  /** Service shutdown: every export stopped (leases released), the endpoint closed. */
  async stop(): Promise<void> {
    clearInterval(this.sweeper);
    await this.server.close();
    await Promise.all(
      [...this.transfers.values()].filter((e) => e.closedAt === undefined).map((e) => this.close(e.ticket.ticketId, { flush: true }).catch(() => undefined)),
    );
    fs.rmSync(this.runRoot, { recursive: true, force: true });
  }
}

/** The factory main.ts calls; `port` 0 would pick a free port — main.ts passes undefined to disable transfers. */
export function createTransferRegistry(opts: TransferRegistryOptions): Promise<ImageTransfers> {
  return ImageTransfers.start(opts);
}

/** The data-mover options of the transfer endpoint (spread into main.ts's options). */
export const transferEndpointOptions = {
  transferPort: {
    type: 'port',
    description: 'HTTPS port of the image transfer endpoint (0 = pick a free one). Served only with a --lease-manager-address.',
    default: 0,
  },
  transferAdvertiseHost: {
    type: 'string',
    description: 'Host name or address put in transfer URLs (empty: --grpc-host, or the host name when that binds every address).',
    default: '',
  },
} as const;

/**
 * Starts the endpoint from the service's config, or returns undefined when this data-mover takes
 * no leases (no --lease-manager-address: it could not hold an export's leases).
 */
export async function startTransferEndpoint(ctx: {
  config: { transferPort: number; transferAdvertiseHost: string; grpcHost: string; leaseManagerAddress: string; logLevel: string; sourceLeaseWaitMs: number };
  hostName: string;
  log: Logger;
  metrics: { registry: Registry };
  tls: { files: TlsFiles | undefined };
  storageGroupId?: number;
}): Promise<ImageTransfers | undefined> {
  const { config } = ctx;
  if (!config.leaseManagerAddress) {
    ctx.log.warn('no --lease-manager-address: image transfers are disabled');
    return undefined;
  }
  const wildcard = ['0.0.0.0', '::', ''].includes(config.grpcHost);
  return createTransferRegistry({
    hostName: ctx.hostName,
    leaseManagerAddress: config.leaseManagerAddress,
    logLevel: config.logLevel,
    storageGroupId: ctx.storageGroupId,
    log: ctx.log,
    registry: ctx.metrics.registry,
    tls: ctx.tls.files,
    port: config.transferPort,
    bindHost: config.grpcHost || '0.0.0.0',
    advertiseHost: config.transferAdvertiseHost || (wildcard ? ctx.hostName : config.grpcHost),
    sharedLeaseWaitMs: config.sourceLeaseWaitMs,
  });
}
