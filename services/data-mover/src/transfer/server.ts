/**
 * The data endpoint of image transfers: HTTPS with the mesh's TLS (this host's server certificate;
 * a client certificate from the mesh CA required, whose sdmesh identity must be the ticket's owner).
 * The HTTP API has the shape of ovirt-imageio's (docs/image-transfer.md, "Data endpoint"):
 *
 *   OPTIONS /images/<ticket>                  allowed methods and features
 *   GET     /images/<ticket>       Range      guest data (206), streamed with backpressure
 *   PUT     /images/<ticket>       Content-Range, ?flush=y|n   streamed writes
 *   PATCH   /images/<ticket>       {"op":"zero",...} | {"op":"flush"}
 *   GET     /images/<ticket>/extents?context=zero|dirty
 *
 * Every check runs before a byte is read or written; a refused request changes nothing.
 */
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { TLSSocket } from 'node:tls';
import {
  BASE_ALLOCATION,
  describeIdentity,
  dirtyBitmapContext,
  identityOfCertificate,
  NBD_STATE_DIRTY,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type Logger,
  type NbdClient,
  type TlsFiles,
} from '@sdmesh/common';
import type { TransferMetrics } from './metrics';
import { checkExtent, HttpError, parseContentRange, parseRange } from './ranges';
import type { OpenTransfer } from './registry';
import { TICKET_ID } from './tickets';

/** Size of one NBD read or write: memory per request is bounded by about two of these. */
export const IO_CHUNK = 4 * 1024 * 1024;
const MAX_PATCH_BODY = 64 * 1024;

export interface TransferServerOptions {
  port: number;
  host: string;
  tls: TlsFiles | undefined;
  tlsReloadMs: number;
  lookup: (ticketId: string) => OpenTransfer | undefined;
  metrics: TransferMetrics;
  log: Logger;
}

function tlsContext(files: TlsFiles): { ca: Buffer; cert: Buffer; key: Buffer } {
  return { ca: fs.readFileSync(files.ca), cert: fs.readFileSync(files.cert), key: fs.readFileSync(files.key) };
}

function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body) + '\n';
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

const clientGone = () => new HttpError(499, 'the client closed the connection');

/** Resolves when the response may take more; rejects when the client is gone (also when it was gone already). */
const waitDrain = (res: http.ServerResponse) =>
  new Promise<void>((resolve, reject) => {
    if (res.destroyed || res.socket?.destroyed) return reject(clientGone());
    const done = () => {
      res.off('drain', done);
      res.off('close', closed);
      resolve();
    };
    const closed = () => {
      res.off('drain', done);
      reject(clientGone());
    };
    res.once('drain', done);
    res.once('close', closed);
  });

export class TransferServer {
  /** The client identity of each TLS connection. */
  private readonly peers = new WeakMap<TLSSocket, string>();

  private constructor(
    private readonly server: http.Server,
    private readonly opts: TransferServerOptions,
    private readonly reload?: NodeJS.Timeout,
  ) {}

  static async listen(opts: TransferServerOptions): Promise<TransferServer> {
    let reload: NodeJS.Timeout | undefined;
    let server: http.Server;
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => void instance.handle(req, res);
    if (opts.tls) {
      const files = opts.tls;
      // The certificate is asked for, and checked in the handler: a client without one gets a 401
      // that says why instead of a reset connection.
      const s = https.createServer({ ...tlsContext(files), requestCert: true, rejectUnauthorized: false }, handler);
      // Certificates rotated in place (cert-manager) are picked up like the gRPC server's.
      let stamp = '';
      reload = setInterval(() => {
        try {
          const now = [files.ca, files.cert, files.key].map((f) => fs.statSync(f).mtimeMs).join('|');
          if (stamp && now !== stamp) s.setSecureContext(tlsContext(files));
          stamp = now;
        } catch (err) {
          opts.log.warn({ err: String(err) }, 'transfer endpoint: TLS files unreadable; keeping the certificates in use');
        }
      }, opts.tlsReloadMs);
      reload.unref();
      server = s;
    } else {
      server = http.createServer(handler);
    }
    // Streams last as long as a disk takes to move: no request timeout, the ticket's idle timeout governs.
    server.requestTimeout = 0;
    server.keepAliveTimeout = 60_000;
    const instance = new TransferServer(server, opts, reload);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, opts.host, () => resolve());
    });
    return instance;
  }

  get port(): number {
    const a = this.server.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  async close(): Promise<void> {
    clearInterval(this.reload);
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const method = req.method ?? 'GET';
    res.once('finish', () => this.opts.metrics.requests.inc({ method, status: String(res.statusCode) }));
    try {
      const url = new URL(req.url ?? '/', 'https://endpoint');
      const m = /^\/images\/([^/]+)(\/extents)?$/.exec(url.pathname);
      if (!m) throw new HttpError(404, `no such resource ${url.pathname}: image transfer URLs are /images/<ticket>`);
      const transfer = this.authorize(req, m[1]!);
      transfer.exchanges.add(res);
      res.once('close', () => transfer.exchanges.delete(res));
      res.once('finish', () => res.statusCode < 400 && transfer.touch());
      const extents = !!m[2];
      if (extents) {
        if (method !== 'GET') throw new HttpError(405, 'extents are read with GET', { Allow: 'GET' });
        return await this.getExtents(transfer, url.searchParams.get('context') ?? 'zero', res);
      }
      switch (method) {
        case 'OPTIONS':
          return this.options(transfer, res);
        case 'GET':
          return await this.get(transfer, req, res);
        case 'PUT':
          this.requireUpload(transfer, method);
          return await this.put(transfer, req, res, url.searchParams.get('flush') ?? 'y');
        case 'PATCH':
          this.requireUpload(transfer, method);
          return await this.patch(transfer, req, res);
        default:
          throw new HttpError(405, `method ${method} is not supported`, { Allow: this.allowed(transfer).join(',') });
      }
    } catch (err) {
      this.refuse(req, res, err);
    }
  }

  private refuse(req: http.IncomingMessage, res: http.ServerResponse, err: unknown): void {
    // Internal errors (NBD, qemu, paths of this host) go to the log, not to the client.
    const e = err instanceof HttpError ? err : new HttpError(500, 'the transfer failed on the data-mover (see its log)');
    if (!(err instanceof HttpError) || e.status >= 500) {
      this.opts.log.warn(
        { err: err instanceof Error ? err.message : String(err), url: req.url?.replace(/\/images\/[^/?]+/, '/images/…') },
        'image transfer request failed',
      );
    }
    if (res.headersSent || e.status === 499) {
      // Half a body was sent: the client sees a truncated response (its length does not match).
      res.destroy();
      return;
    }
    // An unread request body would be taken for the next request on the connection.
    if (!req.complete) res.setHeader('Connection', 'close');
    sendJson(res, e.status, { error: e.message, status: e.status }, e.headers);
  }

  /** The checks every request passes first: the ticket, its state and expiry, the client's identity. */
  private authorize(req: http.IncomingMessage, ticketId: string): OpenTransfer {
    // The certificate first: a client without one learns nothing, not even whether a ticket exists.
    const socket = req.socket as TLSSocket;
    if (this.opts.tls && !socket.authorized) throw new HttpError(401, 'a client certificate issued by the mesh CA is required');
    const transfer = TICKET_ID.test(ticketId) ? this.opts.lookup(ticketId) : undefined;
    if (!transfer) throw new HttpError(404, 'no such transfer ticket on this host (unknown, or it ended long ago)');
    const t = transfer.ticket;
    if (this.opts.tls) {
      // Parsed once per connection (keep-alive clients send many requests on one).
      let who = this.peers.get(socket);
      if (who === undefined) this.peers.set(socket, (who = describeIdentity(identityOfCertificate(socket.getPeerCertificate()))));
      if (t.owner && who !== t.owner) throw new HttpError(403, `this transfer belongs to ${t.owner}; the client certificate is ${who}`);
    }
    if (transfer.stats.failed) throw new HttpError(409, `the transfer failed and is being rolled back: ${transfer.stats.failed}`);
    if (transfer.closing || !transfer.stats.active) throw new HttpError(409, 'the transfer is closed (finalized or cancelled): no more requests are accepted');
    const now = Date.now();
    if (now > t.expiresAt) throw new HttpError(403, `the transfer ticket expired at ${new Date(t.expiresAt).toISOString()}`);
    // Activity (moving the expiry) is counted when a request is answered, not for refused ones.
    return transfer;
  }

  private allowed(transfer: OpenTransfer): string[] {
    return transfer.ticket.direction === 'upload' ? ['OPTIONS', 'GET', 'PUT', 'PATCH'] : ['OPTIONS', 'GET'];
  }

  private requireUpload(transfer: OpenTransfer, method: string): void {
    if (transfer.ticket.direction !== 'upload') throw new HttpError(403, `this ticket is for a download: ${method} is not allowed`, { Allow: 'OPTIONS,GET' });
  }

  private options(transfer: OpenTransfer, res: http.ServerResponse): void {
    const upload = transfer.ticket.direction === 'upload';
    const allow = this.allowed(transfer);
    sendJson(
      res,
      200,
      {
        features: upload ? ['extents', 'zero', 'flush'] : ['extents'],
        size: transfer.ticket.size,
        dirty: !!transfer.ticket.bitmap,
        max_readers: 8,
        max_writers: 8,
      },
      { Allow: allow.join(',') },
    );
  }

  /** Guest data, read through qemu in IO_CHUNK pieces; the next piece is read while one is sent, no more. */
  private async get(transfer: OpenTransfer, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const size = transfer.ticket.size;
    const range = parseRange(req.headers.range, size);
    const length = range.end - range.start;
    await transfer.withNbd(async (nbd) => {
      const headers: Record<string, string | number> = { 'Content-Type': 'application/octet-stream', 'Content-Length': length, 'Accept-Ranges': 'bytes' };
      if (req.headers.range) headers['Content-Range'] = `bytes ${range.start}-${range.end - 1}/${size}`;
      res.writeHead(req.headers.range ? 206 : 200, headers);
      const readAt = (at: number) => nbd.read(at, Math.min(IO_CHUNK, range.end - at));
      let at = range.start;
      let next = at < range.end ? readAt(at) : undefined;
      while (next) {
        const chunk = await next;
        at += chunk.length;
        next = at < range.end ? readAt(at) : undefined;
        next?.catch(() => undefined);
        transfer.stats.bytesRead += chunk.length;
        this.opts.metrics.moved('read', chunk.length);
        transfer.touch();
        // A client that went away stops the stream (and frees the export for close()).
        if (res.destroyed) throw clientGone();
        if (!res.write(chunk)) await waitDrain(res);
      }
      res.end();
    });
  }

  /**
   * A streamed write: the range is checked against the disk first (nothing is written for a
   * refused one), then the body goes to the export in IO_CHUNK pieces, each written before more
   * of the body is read (backpressure on the client's connection).
   */
  private async put(transfer: OpenTransfer, req: http.IncomingMessage, res: http.ServerResponse, flush: string): Promise<void> {
    if (flush !== 'y' && flush !== 'n') throw new HttpError(400, `flush must be y or n, not "${flush}"`);
    const lengthHeader = req.headers['content-length'];
    if (lengthHeader === undefined || !/^\d+$/.test(lengthHeader))
      throw new HttpError(411, 'a PUT needs a Content-Length (the range is checked before anything is written)');
    const range = parseContentRange(req.headers['content-range'], Number(lengthHeader), transfer.ticket.size);
    await transfer.withNbd(async (nbd) => {
      let at = range.start;
      let pending: Buffer[] = [];
      let pendingBytes = 0;
      const writeOut = async () => {
        if (!pendingBytes) return;
        const data = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
        pending = [];
        pendingBytes = 0;
        await nbd.write(at, data);
        at += data.length;
        transfer.stats.bytesWritten += data.length;
        this.opts.metrics.moved('written', data.length);
        transfer.touch();
      };
      for await (const chunk of req as AsyncIterable<Buffer>) {
        if (at + pendingBytes + chunk.length > range.end) throw new HttpError(400, 'the body is longer than its Content-Length');
        pending.push(chunk);
        pendingBytes += chunk.length;
        if (pendingBytes >= IO_CHUNK) await writeOut();
      }
      await writeOut();
      if (at !== range.end) throw new HttpError(400, `the body ended after ${at - range.start} of ${range.end - range.start} bytes`);
      if (flush === 'y') await nbd.flush();
    });
    sendJson(res, 200, { written: range.end - range.start, offset: range.start });
  }

  private async patch(transfer: OpenTransfer, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const body = await readSmallBody(req);
    let msg: { op?: unknown; offset?: unknown; size?: unknown; flush?: unknown };
    try {
      msg = JSON.parse(body) as typeof msg;
    } catch {
      throw new HttpError(400, 'the PATCH body must be JSON: {"op": "zero", "offset": ..., "size": ...} or {"op": "flush"}');
    }
    if (msg.op === 'flush') {
      await transfer.withNbd((nbd) => nbd.flush());
      return sendJson(res, 200, { op: 'flush' });
    }
    if (msg.op !== 'zero') throw new HttpError(400, `unsupported PATCH op ${JSON.stringify(msg.op)}: zero and flush are supported`);
    const range = checkExtent(msg.offset, msg.size, transfer.ticket.size, 'zero range');
    if (msg.flush !== undefined && typeof msg.flush !== 'boolean') throw new HttpError(400, 'flush must be true or false');
    await transfer.withNbd(async (nbd) => {
      await nbd.writeZeroes(range.start, range.end - range.start);
      if (msg.flush) await nbd.flush();
    });
    this.opts.metrics.zeroedBytes.inc(range.end - range.start);
    sendJson(res, 200, { op: 'zero', offset: range.start, size: range.end - range.start });
  }

  /** Extents of the whole disk: allocation/zero (context=zero) or the ticket's bitmap (context=dirty). */
  private async getExtents(transfer: OpenTransfer, context: string, res: http.ServerResponse): Promise<void> {
    const size = transfer.ticket.size;
    if (context === 'zero') {
      const list = await transfer.withNbd((nbd) => extentsUpTo(nbd, BASE_ALLOCATION, size));
      return sendJson(
        res,
        200,
        list.map((e) => ({ start: e.offset, length: e.length, zero: (e.flags & NBD_STATE_ZERO) !== 0, hole: (e.flags & NBD_STATE_HOLE) !== 0 })),
      );
    }
    if (context === 'dirty') {
      const bitmap = transfer.ticket.bitmap;
      if (!bitmap)
        throw new HttpError(404, 'this transfer has no bitmap: dirty extents are only served for an incremental backup (a download started with a bitmap)');
      const list = await transfer.withNbd((nbd) => extentsUpTo(nbd, dirtyBitmapContext(bitmap), size));
      return sendJson(
        res,
        200,
        list.map((e) => ({ start: e.offset, length: e.length, dirty: (e.flags & NBD_STATE_DIRTY) !== 0 })),
      );
    }
    throw new HttpError(400, `unknown extents context "${context}": zero or dirty`);
  }
}

/** Extents within the ticket's size (the volume may be larger than the disk the ticket names). */
function extentsUpTo(nbd: NbdClient, context: string, size: number) {
  return nbd.extents(context, 0, Math.min(size, nbd.size));
}

async function readSmallBody(req: http.IncomingMessage): Promise<string> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_PATCH_BODY) throw new HttpError(413, `a PATCH body is at most ${MAX_PATCH_BODY} bytes`);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_PATCH_BODY) throw new HttpError(413, `a PATCH body is at most ${MAX_PATCH_BODY} bytes`);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}
