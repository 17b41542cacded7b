import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import path from 'node:path';
import { Registry } from 'prom-client';
import { createLogger } from '@sdmesh/common';
import { LocalPki } from '@sdmesh/localmesh';
import { EndpointError, TransferEndpoint } from '../../packages/sdmctl/src/transfer/endpoint';
import { TransferMetrics } from '../../services/data-mover/src/transfer/metrics';
import { checkExtent, HttpError, parseContentRange, parseRange } from '../../services/data-mover/src/transfer/ranges';
import { checkTicket, OpenTransfer } from '../../services/data-mover/src/transfer/registry';
import { TransferServer } from '../../services/data-mover/src/transfer/server';
import { newTicketId, type TransferTicket } from '../../services/data-mover/src/transfer/tickets';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The data endpoint's HTTP layer on real parts without a mesh: real HTTPS with certificates of a
 * local mesh CA, a real qemu-nbd exporting a qcow2 file, the sdmctl client. Ranges, ticket checks
 * and refusals (nothing written), and the ranges parser alone.
 */

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

describe('range parsing', () => {
  const status = (fn: () => unknown) => {
    try {
      fn();
      return 0;
    } catch (err) {
      return (err as HttpError).status;
    }
  };
  test('Range: whole, a-b, a-, suffix; refused outside the disk (416) or malformed (400)', () => {
    expect(parseRange(undefined, 100)).toEqual({ start: 0, end: 100 });
    expect(parseRange('bytes=10-19', 100)).toEqual({ start: 10, end: 20 });
    expect(parseRange('bytes=90-', 100)).toEqual({ start: 90, end: 100 });
    expect(parseRange('bytes=-10', 100)).toEqual({ start: 90, end: 100 });
    expect(status(() => parseRange('bytes=90-100', 100))).toBe(416);
    expect(status(() => parseRange('bytes=100-', 100))).toBe(416);
    expect(status(() => parseRange('bytes=-101', 100))).toBe(416);
    expect(status(() => parseRange('bytes=5-1', 100))).toBe(400);
    expect(status(() => parseRange('bytes=0-1,5-6', 100))).toBe(400);
    expect(status(() => parseRange('items=0-1', 100))).toBe(400);
    expect(status(() => parseRange('bytes=99999999999999999999-', 100))).toBe(400);
  });
  test('Content-Range must match the body length and lie inside the disk', () => {
    expect(parseContentRange('bytes 10-19/*', 10, 100)).toEqual({ start: 10, end: 20 });
    expect(parseContentRange('bytes 0-99/100', 100, 100)).toEqual({ start: 0, end: 100 });
    expect(parseContentRange(undefined, 40, 100)).toEqual({ start: 0, end: 40 });
    expect(status(() => parseContentRange('bytes 95-104/*', 10, 100))).toBe(416);
    expect(status(() => parseContentRange(undefined, 101, 100))).toBe(416);
    expect(status(() => parseContentRange('bytes 10-19/*', 5, 100))).toBe(400);
    expect(status(() => parseContentRange('bytes=10-19', 10, 100))).toBe(400);
    expect(checkExtent(0, 100, 100, 'zero')).toEqual({ start: 0, end: 100 });
    expect(status(() => checkExtent(1, 100, 100, 'zero'))).toBe(416);
    expect(status(() => checkExtent(-1, 1, 100, 'zero'))).toBe(400);
    expect(status(() => checkExtent('1', 1, 100, 'zero'))).toBe(400);
  });
});

/** A well-formed upload ticket of alice's (fields overridden by `over`). */
const makeTicket = (over: Partial<TransferTicket> = {}): TransferTicket => ({
  ticketId: newTicketId(),
  transferId: 'op-1',
  owner: 'sdmesh://user/alice',
  diskId: crypto.randomUUID(),
  domainId: crypto.randomUUID(),
  domainPath: '/var/tmp/d',
  imageId: crypto.randomUUID(),
  volumeIds: [crypto.randomUUID()],
  generation: 0,
  direction: 'upload',
  format: 'raw',
  size: SIZE,
  expiresAt: Date.now() + 60_000,
  idleTimeoutMs: 60_000,
  ...over,
});

describe('ticket checks', () => {
  const base = () => makeTicket();
  test('a well-formed ticket passes; each bad field is refused INVALID_ARGUMENT', () => {
    expect(() => checkTicket(base())).not.toThrow();
    const bad: Array<Partial<TransferTicket>> = [
      { ticketId: 'short' },
      { direction: 'sideways' as never },
      { volumeIds: [] },
      { volumeIds: ['../etc'] },
      { size: 0 },
      { generation: -1 },
      { bitmap: 'b1' }, // a bitmap on an upload
      { direction: 'download', bitmap: 'bad name' },
    ];
    for (const b of bad) expect(() => checkTicket({ ...base(), ...b })).toThrow(expect.objectContaining({ code: 3 }));
  });
});

describe('HTTPS endpoint over a real qemu-nbd export', () => {
  const dir = makeTestDir('transfer-endpoint');
  const pki = new LocalPki(path.join(dir, 'pki'));
  const image = path.join(dir, 'disk.qcow2');
  const children: ChildProcess[] = [];
  const transfers = new Map<string, OpenTransfer>();
  const metrics = new TransferMetrics(new Registry());
  let server: TransferServer;
  let socket = '';
  const alice = pki.forIdentity({ kind: 'user', name: 'alice' });
  const bob = pki.forIdentity({ kind: 'user', name: 'bob' });

  const open = (over: Partial<TransferTicket> = {}): OpenTransfer => {
    const ticket = makeTicket({ transferId: `op-${transfers.size}`, domainPath: dir, ...over });
    const t = new OpenTransfer(ticket, dir, children[0]!);
    t.socket = socket;
    t.stats.active = true;
    transfers.set(ticket.ticketId, t);
    return t;
  };
  const client = (t: OpenTransfer, who = alice, ticketId = t.ticket.ticketId) =>
    new TransferEndpoint(`https://127.0.0.1:${server.port}/images/${ticketId}`, { host: 'host1', tls: who });
  const imageSha = () => {
    const raw = path.join(dir, 'check.raw');
    execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', image, raw]);
    const sha = crypto.createHash('sha256').update(fs.readFileSync(raw)).digest('hex');
    fs.rmSync(raw);
    return sha;
  };
  const statusOf = async (p: Promise<unknown>) => {
    try {
      await p;
      return 200;
    } catch (err) {
      if (!(err instanceof EndpointError)) throw err;
      return err.status;
    }
  };

  beforeAll(async () => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
    socket = path.join(dir, 'nbd.sock');
    children.push(spawn('qemu-nbd', ['--socket', socket, '--persistent', '--shared', '8', '-f', 'qcow2', '--discard=unmap', image], { stdio: 'ignore' }));
    for (let i = 0; i < 500 && !fs.existsSync(socket); i++) await new Promise((r) => setTimeout(r, 20));
    const files = pki.forIdentity({ kind: 'host', host: 'host1', service: 'data-mover' });
    server = await TransferServer.listen({
      port: 0,
      host: '127.0.0.1',
      tls: files,
      tlsReloadMs: 60_000,
      lookup: (id) => transfers.get(id),
      metrics,
      log: createLogger('test', 'silent'),
    });
  });
  afterAll(async () => {
    await server?.close();
    for (const c of children) c.kill('SIGKILL');
    removeTestDir(dir);
  });

  test('PUT ranges, GET them back (206), PATCH zero and flush, extents: allocation follows; stats and metrics count the bytes', async () => {
    const t = open();
    const c = client(t);
    try {
      expect(await c.options()).toMatchObject({ features: ['extents', 'zero', 'flush'], size: SIZE });
      const data = crypto.randomBytes(5 * MiB + 123);
      await c.write(3 * MiB, data);
      expect((await c.read(3 * MiB, 3 * MiB + data.length)).equals(data)).toBe(true);
      expect((await c.read(0, MiB)).every((b) => b === 0)).toBe(true);
      expect(t.stats.bytesWritten).toBe(data.length);
      expect(t.stats.bytesRead).toBe(data.length + MiB);

      const extents = await c.zeroExtents();
      expect(extents.reduce((s, e) => s + e.length, 0)).toBe(SIZE);
      const nonZero = extents.filter((e) => !e.zero);
      expect(nonZero[0]!.start).toBeLessThanOrEqual(3 * MiB);
      expect(nonZero.at(-1)!.start + nonZero.at(-1)!.length).toBeGreaterThanOrEqual(3 * MiB + data.length);

      await c.zero(3 * MiB, 6 * MiB, true);
      await c.flush();
      expect((await c.zeroExtents()).filter((e) => !e.zero)).toEqual([]);
      expect((await c.read(3 * MiB, 9 * MiB)).every((b) => b === 0)).toBe(true);
    } finally {
      c.close();
    }
  });

  test('a client that goes away mid-GET stops the stream: the request ends and the transfer can close', async () => {
    const t = open({ direction: 'download' });
    await new Promise<void>((resolve, reject) => {
      const req = https.request(
        {
          host: '127.0.0.1',
          port: server.port,
          path: `/images/${t.ticket.ticketId}`,
          method: 'GET',
          ca: fs.readFileSync(alice.ca),
          cert: fs.readFileSync(alice.cert),
          key: fs.readFileSync(alice.key),
          checkServerIdentity: () => undefined,
        },
        (res) => {
          expect(res.statusCode).toBe(200);
          res.once('data', () => {
            req.destroy();
            resolve();
          });
        },
      );
      req.on('error', () => undefined);
      req.on('close', () => resolve());
      req.end();
      setTimeout(() => reject(new Error('no data')), 30_000);
    });
    // The whole disk was asked for; the server stops long before it is read.
    await Promise.race([t.drain(), new Promise((_, reject) => setTimeout(() => reject(new Error('the GET did not end')), 30_000))]);
    expect(t.inFlight).toBe(0);
    expect(t.stats.bytesRead).toBeLessThan(SIZE);
  });

  test('refusals change nothing: unknown ticket 404, other identity 403, no certificate 401, write on a download 403, outside the disk 416, expired 403, closed 409', async () => {
    const up = open();
    const seed = crypto.randomBytes(MiB);
    const c = client(up);
    await c.write(0, seed);
    const before = imageSha();

    const unknown = client(up, alice, newTicketId());
    expect(await statusOf(unknown.read(0, 10))).toBe(404);
    unknown.close();
    const malformed = client(up, alice, 'not-a-ticket');
    expect(await statusOf(malformed.options())).toBe(404);
    malformed.close();

    const asBob = client(up, bob);
    expect(await statusOf(asBob.write(0, Buffer.alloc(4096, 1)))).toBe(403);
    expect(await statusOf(asBob.read(0, 10))).toBe(403);
    asBob.close();

    // A TLS client without a certificate: told why, not reset.
    const anonymous = await new Promise<number>((resolve, reject) => {
      const req = https.request(
        {
          host: '127.0.0.1',
          port: server.port,
          path: `/images/${up.ticket.ticketId}`,
          method: 'GET',
          ca: fs.readFileSync(alice.ca),
          checkServerIdentity: () => undefined,
        },
        (res) => (res.resume(), resolve(res.statusCode!)),
      );
      req.on('error', reject);
      req.end();
    });
    expect(anonymous).toBe(401);

    const down = open({ direction: 'download' });
    const d = client(down);
    expect(await statusOf(d.write(0, Buffer.alloc(4096, 2)))).toBe(403);
    expect(await statusOf(d.zero(0, 4096))).toBe(403);
    expect((await d.read(0, MiB)).equals(seed)).toBe(true);
    d.close();

    expect(await statusOf(c.write(SIZE - 4096, Buffer.alloc(8192, 3)))).toBe(416);
    expect(await statusOf(c.read(SIZE - 10, SIZE + 10))).toBe(416);
    expect(await statusOf(c.zero(SIZE - 4096, 8192))).toBe(416);

    const expired = open({ expiresAt: Date.now() - 1 });
    const e = client(expired);
    expect(await statusOf(e.write(0, Buffer.alloc(4096, 4)))).toBe(403);
    e.close();

    up.closing = true;
    expect(await statusOf(c.write(0, Buffer.alloc(4096, 5)))).toBe(409);
    c.close();

    expect(imageSha()).toBe(before);
  });
});
