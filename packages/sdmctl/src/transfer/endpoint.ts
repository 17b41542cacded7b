import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { serverIdentityCheck } from '@sdmesh/common';

/**
 * A client of a data-mover's image transfer endpoint (docs/image-transfer.md, "Data endpoint"):
 * mutual TLS with the user's certificate; the server must present a data-mover's sdmesh identity
 * (of the host the transfer names, when known), not merely a name that matches the URL.
 */

export interface EndpointTls {
  ca: string;
  cert: string;
  key: string;
}

export interface ZeroExtent {
  start: number;
  length: number;
  zero: boolean;
  hole: boolean;
}
export interface DirtyExtent {
  start: number;
  length: number;
  dirty: boolean;
}

/** An HTTP error answer of the endpoint; `message` is the server's explanation. */
export class EndpointError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'EndpointError';
  }
}

/** Network failures a retry may get past (the connection dropped), unlike refusals. */
export function isRetryable(err: unknown): boolean {
  if (err instanceof EndpointError) return err.status >= 500;
  const code = (err as NodeJS.ErrnoException).code ?? '';
  return (
    ['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', 'UND_ERR_SOCKET', 'ERR_STREAM_PREMATURE_CLOSE'].includes(code) ||
    /socket hang up|aborted/i.test(String(err))
  );
}

export class TransferEndpoint {
  private readonly url: URL;
  private readonly agent: http.Agent;
  private readonly request: typeof https.request | typeof http.request;

  constructor(url: string, opts: { tls?: EndpointTls; host?: string }) {
    this.url = new URL(url);
    if (this.url.protocol === 'https:') {
      if (!opts.tls) throw new Error('an https transfer URL needs the mesh CA and a client certificate (--tls-ca, --tls-cert, --tls-key)');
      const accept = (id: { kind: string; host?: string; service?: string }) =>
        id.kind === 'host' && id.service === 'data-mover' && (!opts.host || id.host === opts.host);
      this.agent = new https.Agent({
        keepAlive: true,
        maxSockets: 4,
        ca: fs.readFileSync(opts.tls.ca),
        cert: fs.readFileSync(opts.tls.cert),
        key: fs.readFileSync(opts.tls.key),
        checkServerIdentity: serverIdentityCheck(accept as Parameters<typeof serverIdentityCheck>[0]),
      });
      this.request = https.request;
    } else {
      this.agent = new http.Agent({ keepAlive: true, maxSockets: 4 });
      this.request = http.request;
    }
  }

  close(): void {
    this.agent.destroy();
  }

  private send(
    method: string,
    pathSuffix: string,
    headers: Record<string, string | number>,
    body?: Buffer | NodeJS.ReadableStream,
  ): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      const req = this.request(new URL(this.url.pathname + pathSuffix, this.url), { method, headers, agent: this.agent as https.Agent }, (res) => {
        if ((res.statusCode ?? 0) >= 400) {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (text += c));
          res.on('end', () => {
            let msg = text.trim();
            try {
              msg = (JSON.parse(text) as { error?: string }).error ?? msg;
            } catch {
              // not JSON: the text as it is
            }
            reject(new EndpointError(res.statusCode!, `${method} ${res.statusCode}: ${msg}`));
          });
          res.on('error', reject);
          return;
        }
        resolve(res);
      });
      req.on('error', reject);
      if (!body) req.end();
      else if (Buffer.isBuffer(body)) req.end(body);
      else (body as NodeJS.ReadableStream).pipe(req);
    });
  }

  private async json<T>(method: string, suffix: string, headers: Record<string, string | number> = {}, body?: Buffer): Promise<T> {
    const res = await this.send(method, suffix, headers, body);
    const chunks: Buffer[] = [];
    for await (const c of res as AsyncIterable<Buffer>) chunks.push(c);
    const text = Buffer.concat(chunks).toString('utf8');
    return (text ? JSON.parse(text) : {}) as T;
  }

  options(): Promise<{ features: string[]; size: number; dirty: boolean }> {
    return this.json('OPTIONS', '');
  }

  zeroExtents(): Promise<ZeroExtent[]> {
    return this.json('GET', '/extents?context=zero');
  }

  dirtyExtents(): Promise<DirtyExtent[]> {
    return this.json('GET', '/extents?context=dirty');
  }

  /** Reads [start, end) of the disk; the whole body, checked for length. */
  async read(start: number, end: number): Promise<Buffer> {
    const res = await this.send('GET', '', { Range: `bytes=${start}-${end - 1}` });
    const chunks: Buffer[] = [];
    for await (const c of res as AsyncIterable<Buffer>) chunks.push(c);
    const data = Buffer.concat(chunks);
    if (data.length !== end - start) throw Object.assign(new Error(`short read: ${data.length} of ${end - start} bytes`), { code: 'ECONNRESET' });
    return data;
  }

  /** Writes data at offset; resolves when the server acknowledged it (written, and flushed if asked). */
  async write(offset: number, data: Buffer, flush = false): Promise<void> {
    await this.json(
      'PUT',
      `?flush=${flush ? 'y' : 'n'}`,
      {
        'Content-Length': data.length,
        'Content-Range': `bytes ${offset}-${offset + data.length - 1}/*`,
        'Content-Type': 'application/octet-stream',
      },
      data,
    );
  }

  async zero(offset: number, size: number, flush = false): Promise<void> {
    const body = Buffer.from(JSON.stringify({ op: 'zero', offset, size, flush }));
    await this.json('PATCH', '', { 'Content-Type': 'application/json', 'Content-Length': body.length }, body);
  }

  async flush(): Promise<void> {
    const body = Buffer.from(JSON.stringify({ op: 'flush' }));
    await this.json('PATCH', '', { 'Content-Type': 'application/json', 'Content-Length': body.length }, body);
  }
}
