import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import {
  encodeFrame,
  FrameError,
  FrameKind,
  FrameReader,
  frameMethodId,
  HEADER_BYTES,
  LeaseFramesClient,
  leaseFramesSocketPath,
  localLeaseManagerClient,
  MAX_FRAME_BODY,
  MAX_REPLY_BODY,
  MAX_UNSENT_ANSWER_BYTES,
  pb,
  SdmeshError,
  type CallContext,
  type Frame,
} from '@sdmesh/common/internal';
import { waitFor } from '@sdmesh/localmesh';
import { leaseFramesTestServer, recordingLog } from '../harness/lease-frames-server';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The lease frame socket as a security boundary (security review, session 9): what a hostile or
 * broken local peer can do to the lease-manager over it, and what a hostile server can do to a
 * LeaseHolder. A GrpcServer with test handlers on a real unix socket; this process is the peer.
 */
describe('lease frames: hostile peers', () => {
  const dir = makeTestDir('lease-frames-sec');
  const grpcSocket = path.join(dir, 'run', 'lease-manager.sock');
  const framesSocket = leaseFramesSocketPath(grpcSocket);
  const { log } = recordingLog();
  /** What AcquireLease does next; AcquireLeases grants every lease asked, each echoing the operation id (as the lease-manager's table does). */
  let acquire: (req: pb.AcquireLeaseRequest, ctx: CallContext) => Promise<pb.Lease>;
  const acquireLeases = async (req: pb.AcquireLeasesRequest): Promise<pb.AcquireLeasesResponse> =>
    pb.AcquireLeasesResponse.fromPartial({
      leases: req.leases.map((l) => ({ location: l.lease, mode: l.mode, holderPid: req.holderPid, operationId: req.operationId, lver: 1, hostId: 1 })),
    });
  const newServer = () => leaseFramesTestServer({ grpcSocket, framesSocket, log, handlers: { acquireLease: (req, ctx) => acquire(req, ctx), acquireLeases } });
  let server = newServer();
  const grpcClient = localLeaseManagerClient(`unix:${grpcSocket}`);
  const frames = new LeaseFramesClient(framesSocket);
  const calls = frames.calls();
  const location = { lockspace: 'ls', resource: 'r1', path: '/var/lib/sdmesh/d/dom_md/leases', offset: 1048576 };
  const request = { lease: location, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: process.pid, operationId: 'op-1' };
  const acquireBody = pb.AcquireLeaseRequest.encode(pb.AcquireLeaseRequest.fromPartial(request)).finish();
  const ACQUIRE = frameMethodId('sdmesh.v1.LeaseManagerService/AcquireLease');
  /** The connections the frame server holds (white box: its write buffers are what a peer can grow). */
  const serverConnections = () => [...(server as unknown as { framesServer: { connections: Set<net.Socket> } }).framesServer.connections];

  beforeAll(() => server.start());
  afterAll(async () => {
    frames.close();
    grpcClient.close();
    await server.shutdown(1000);
    removeTestDir(dir);
  });

  const connect = () =>
    new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(framesSocket, () => resolve(s));
      s.once('error', reject);
    });
  /** The frames a raw connection receives, as they come. */
  const framesOf = (s: net.Socket) => {
    const got: Frame[] = [];
    const reader = new FrameReader();
    s.on('data', (d: Buffer) => got.push(...reader.push(d)));
    return got;
  };

  it('the socket is 0600 in a 0700 directory; a restart replaces the stale socket, a non-socket at its path is left and refused', async () => {
    expect(fs.statSync(framesSocket).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(framesSocket)).mode & 0o777).toBe(0o700);
    await server.shutdown(1000);
    expect(fs.existsSync(framesSocket)).toBe(false);
    // A killed predecessor's socket file: a listening-less socket at the path.
    // A killed predecessor's socket file: a process that listened there and died by SIGKILL.
    spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(framesSocket)}, () => process.kill(process.pid, 'SIGKILL'))`]);
    expect(fs.lstatSync(framesSocket).isSocket()).toBe(true);
    server = newServer();
    await server.start();
    acquire = async (req) => pb.Lease.fromPartial({ location: req.lease, lver: 2 });
    expect(await calls.acquireLease(request)).toMatchObject({ lver: 2 });
    await server.shutdown(1000);
    fs.writeFileSync(framesSocket, 'not a socket');
    server = newServer();
    try {
      await expect(server.start()).rejects.toThrow(/exists and is not a socket/);
      await server.shutdown(1000);
      // Not ours: the failed start's shutdown leaves it too.
      expect(fs.readFileSync(framesSocket, 'utf8')).toBe('not a socket');
    } finally {
      fs.rmSync(framesSocket, { force: true });
      server = newServer();
      await server.start();
    }
  });

  it('a CANCEL for a call id never sent, a zero-length body and call id 0 are answered or ignored without closing the connection', async () => {
    const seen: pb.AcquireLeaseRequest[] = [];
    acquire = async (req) => {
      seen.push(req);
      return pb.Lease.fromPartial({ location: req.lease, lver: 3 });
    };
    const s = await connect();
    const got = framesOf(s);
    s.write(encodeFrame({ callId: 77, kind: FrameKind.CANCEL, arg: 0, deadlineMs: 0 }));
    s.write(encodeFrame({ callId: 0, kind: FrameKind.REQUEST, arg: ACQUIRE, deadlineMs: 0 }));
    await waitFor('the answer to the empty request', async () => (got.length ? true : undefined), 10_000, 20);
    // An empty body is the default request: the handler's own validation answers it (here it grants).
    expect(seen).toEqual([pb.AcquireLeaseRequest.fromPartial({})]);
    expect([got[0]!.callId, got[0]!.kind]).toEqual([0, FrameKind.REPLY]);
    expect(s.destroyed).toBe(false);
    s.destroy();
  });

  it('a partial frame is held (bounded) until the rest comes, however slowly; the peer closing then frees it', async () => {
    acquire = async (req) => pb.Lease.fromPartial({ location: req.lease, lver: 4 });
    const s = await connect();
    const got = framesOf(s);
    const whole = encodeFrame({ callId: 1, kind: FrameKind.REQUEST, arg: ACQUIRE, deadlineMs: 0, body: acquireBody });
    for (let i = 0; i < whole.length; i++) {
      s.write(whole.subarray(i, i + 1));
      await new Promise((r) => setImmediate(r));
    }
    await waitFor('the answer to the trickled frame', async () => (got.length ? true : undefined), 10_000, 20);
    expect([got[0]!.callId, got[0]!.kind]).toEqual([1, FrameKind.REPLY]);
    // Half a header, then gone: the server drops the connection.
    s.write(whole.subarray(0, HEADER_BYTES / 2));
    s.destroy();
    await waitFor('the server to drop the connection', async () => (serverConnections().length === 0 ? true : undefined), 10_000, 20);
  });

  it('a connection closed during a call cancels the handler (as a gRPC stream reset does)', async () => {
    let aborted!: (code: number) => void;
    const abortedWith = new Promise<number>((r) => (aborted = r));
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    acquire = (_req, ctx) => {
      ctx.signal.addEventListener('abort', () => aborted(SdmeshError.from(ctx.signal.reason).code));
      started();
      return new Promise(() => undefined);
    };
    const s = await connect();
    s.write(encodeFrame({ callId: 1, kind: FrameKind.REQUEST, arg: ACQUIRE, deadlineMs: 0, body: acquireBody }));
    await running;
    s.destroy();
    expect(await abortedWith).toBe(status.CANCELLED);
  });

  it("a deadline of more than 24.8 days (past setTimeout) is no deadline passing at once (server and client; grpc-js's own client cannot carry one either)", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const aborts: unknown[] = [];
    let running = 0;
    acquire = async (req, ctx) => {
      ctx.signal.addEventListener('abort', () => aborts.push(SdmeshError.from(ctx.signal.reason).code));
      running++;
      await gate;
      return pb.Lease.fromPartial({ location: req.lease, lver: 5 });
    };
    const s = await connect();
    const got = framesOf(s);
    s.write(encodeFrame({ callId: 1, kind: FrameKind.REQUEST, arg: ACQUIRE, deadlineMs: 0xffffffff, body: acquireBody }));
    const fortyDays = 40 * 24 * 3600 * 1000;
    const viaClient = calls.acquireLease(request, { timeoutMs: fortyDays });
    await waitFor('the two calls in the handler', async () => (running === 2 ? true : undefined), 10_000, 20);
    // A timer that overflowed fires after 1 ms: give it many turns of the event loop to show.
    for (let i = 0; i < 20; i++) await new Promise((r) => setTimeout(r, 5));
    expect(aborts).toEqual([]);
    release();
    expect(await viaClient).toMatchObject({ lver: 5 });
    await waitFor('the raw call answered', async () => (got.length ? true : undefined), 10_000, 20);
    expect([got[0]!.callId, got[0]!.kind]).toEqual([1, FrameKind.REPLY]);
    s.destroy();
  });

  it('an answer larger than a request may be (AcquireLeases repeats the operation id per lease) reaches the client as on gRPC, not INTERNAL after the grant', async () => {
    const req = {
      leases: [1, 2, 3, 4].map((i) => ({ lease: { ...location, resource: `r${i}` }, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE })),
      holderPid: process.pid,
      operationId: 'o'.repeat(30_000),
    };
    const viaGrpc = await grpcClient.acquireLeases(req);
    expect(pb.AcquireLeasesResponse.encode(viaGrpc).finish().length).toBeGreaterThan(64 * 1024);
    expect(await calls.acquireLeases(req)).toEqual(viaGrpc);
    // Answers have their own (gRPC's) limit; requests keep theirs.
    expect(() => encodeFrame({ callId: 1, kind: FrameKind.REPLY, arg: 0, deadlineMs: 0, body: Buffer.alloc(MAX_REPLY_BODY + 1) })).toThrow(FrameError);
    expect(() => encodeFrame({ callId: 1, kind: FrameKind.REQUEST, arg: 1, deadlineMs: 0, body: Buffer.alloc(MAX_FRAME_BODY + 1) })).toThrow(FrameError);
  });

  it("a peer that sends requests and never reads the answers cannot grow the lease-manager's memory without bound; nothing is lost once it reads", async () => {
    const earlier = new Set(serverConnections());
    const s = await connect();
    // Requests the server answers at once (a method id it does not serve): ~14 bytes in, ~100 out each.
    const count = 100_000;
    const batch = Buffer.concat(Array.from({ length: count }, (_, i) => encodeFrame({ callId: i + 1, kind: FrameKind.REQUEST, arg: 250, deadlineMs: 0 })));
    s.pause();
    s.write(batch);
    // Either the server read every request (it then holds every answer it could not send) or it stopped reading.
    const conn = await waitFor(
      'the server to read all or stop reading',
      async () => {
        const c = serverConnections().find((x) => !earlier.has(x));
        return c && (c.bytesRead === batch.length || c.isPaused()) ? c : undefined;
      },
      20_000,
      20,
    );
    let most = conn.writableLength;
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 5));
      most = Math.max(most, conn.writableLength);
    }
    // Bounded: the limit plus the answers to what it had read before it stopped (one read of the socket).
    expect(most).toBeLessThanOrEqual(MAX_UNSENT_ANSWER_BYTES + 1024 * 1024);
    expect(conn.bytesRead).toBeLessThan(batch.length);
    const reader = new FrameReader();
    let answers = 0;
    let last = 0;
    s.on('data', (d: Buffer) => {
      for (const f of reader.push(d)) {
        answers++;
        expect([f.kind, f.arg]).toEqual([FrameKind.ERROR, status.UNIMPLEMENTED]);
        expect(f.callId).toBe(last + 1);
        last = f.callId;
      }
    });
    s.resume();
    await waitFor('every answer', async () => (answers === count ? true : undefined), 30_000, 50);
    s.destroy();
  });
});

describe('lease frames client: a hostile or restarted server', () => {
  const dir = makeTestDir('lease-frames-sec-client');
  afterAll(() => removeTestDir(dir));
  const request = { lease: { lockspace: 'ls', resource: 'r', path: '/p', offset: 0 }, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, operationId: 'op' };

  /** A server that answers each request frame as `answer` says. */
  const hostile = async (name: string, answer: (req: Frame, s: net.Socket) => void) => {
    const socketPath = path.join(dir, name);
    const srv = net.createServer((s) => {
      const reader = new FrameReader();
      s.on('error', () => undefined);
      s.on('data', (d: Buffer) => {
        for (const f of reader.push(d)) answer(f, s);
      });
    });
    await new Promise<void>((r) => srv.listen(socketPath, r));
    return { client: new LeaseFramesClient(socketPath), close: () => srv.close() };
  };

  it('a reply for a call id it never sent is ignored; the real answer still settles the call', async () => {
    const { client, close } = await hostile('stray.sock', (f, s) => {
      s.write(
        encodeFrame({
          callId: f.callId + 1000,
          kind: FrameKind.REPLY,
          arg: 0,
          deadlineMs: 0,
          body: pb.Lease.encode(pb.Lease.fromPartial({ lver: 666 })).finish(),
        }),
      );
      s.write(
        encodeFrame({ callId: f.callId, kind: FrameKind.REPLY, arg: 0, deadlineMs: 0, body: pb.Lease.encode(pb.Lease.fromPartial({ lver: 8 })).finish() }),
      );
    });
    try {
      expect(await client.calls().acquireLease(request, { timeoutMs: 10_000 })).toMatchObject({ lver: 8 });
    } finally {
      client.close();
      close();
    }
  });

  it('an oversize header, a REQUEST or CANCEL frame, or an undecodable answer from the server end the call with an error, never a crash', async () => {
    const bad: Record<string, (f: Frame, s: net.Socket) => void> = {
      'oversize.sock': (_f, s) => {
        const h = Buffer.alloc(HEADER_BYTES);
        h.writeUInt32BE(0xffffffff, 0);
        h.writeUInt8(FrameKind.REPLY, 8);
        s.write(h);
      },
      'request.sock': (f, s) => s.write(encodeFrame({ callId: f.callId, kind: FrameKind.REQUEST, arg: 1, deadlineMs: 0 })),
      'cancel.sock': (f, s) => s.write(encodeFrame({ callId: f.callId, kind: FrameKind.CANCEL, arg: 0, deadlineMs: 0 })),
      'undecodable.sock': (f, s) =>
        s.write(encodeFrame({ callId: f.callId, kind: FrameKind.REPLY, arg: 0, deadlineMs: 0, body: Buffer.from([0xff, 0xff, 0xff]) })),
      'error-garbage.sock': (f, s) =>
        s.write(encodeFrame({ callId: f.callId, kind: FrameKind.ERROR, arg: 250, deadlineMs: 0, body: Buffer.from('{not json') })),
    };
    const outcomes: Record<string, unknown> = {};
    for (const [name, answer] of Object.entries(bad)) {
      const { client, close } = await hostile(name, answer);
      try {
        const err = await client
          .calls()
          .acquireLease(request, { timeoutMs: 10_000 })
          .catch((e: unknown) => e);
        expect(err).toBeInstanceOf(SdmeshError);
        outcomes[name] = (err as SdmeshError).code;
      } finally {
        client.close();
        close();
      }
    }
    expect(outcomes).toEqual({
      'oversize.sock': status.UNAVAILABLE,
      'request.sock': status.UNAVAILABLE,
      'cancel.sock': status.UNAVAILABLE,
      'undecodable.sock': status.INTERNAL,
      'error-garbage.sock': 250,
    });
  });
});

describe('lease frames: a peer trickling bytes', () => {
  it('a frame sent a byte at a time is joined once it is whole, not once per byte (no quadratic copying in the lease-manager)', () => {
    const whole = encodeFrame({ callId: 3, kind: FrameKind.REQUEST, arg: 1, deadlineMs: 0, body: Buffer.alloc(MAX_FRAME_BODY, 7) });
    const concat = jest.spyOn(Buffer, 'concat');
    try {
      const reader = new FrameReader();
      const got: Frame[] = [];
      for (let i = 0; i < whole.length; i++) got.push(...reader.push(whole.subarray(i, i + 1)));
      expect(got.map((f) => [f.callId, f.body.length, f.body[MAX_FRAME_BODY - 1]])).toEqual([[3, MAX_FRAME_BODY, 7]]);
      // Once for the header, once for the whole frame.
      expect(concat.mock.calls.length).toBeLessThanOrEqual(2);
    } finally {
      concat.mockRestore();
    }
  });
});

describe('lease frames: shutdown', () => {
  const dir = makeTestDir('lease-frames-sec-shutdown');
  afterAll(() => removeTestDir(dir));

  it('a call in flight on the frame socket gets the grace period a gRPC call gets: answered, not cut; a new call is refused UNAVAILABLE', async () => {
    const grpcSocket = path.join(dir, 'run', 'lease-manager.sock');
    const framesSocket = leaseFramesSocketPath(grpcSocket);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    const server = leaseFramesTestServer({
      grpcSocket,
      framesSocket,
      log: recordingLog().log,
      handlers: {
        acquireLease: async (req) => {
          started();
          await gate;
          return pb.Lease.fromPartial({ location: req.lease, lver: 9 });
        },
      },
    });
    await server.start();
    const frames = new LeaseFramesClient(framesSocket);
    const request = { lease: { lockspace: 'ls', resource: 'r', path: '/p', offset: 0 }, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, operationId: 'op' };
    try {
      const call = frames
        .calls()
        .acquireLease(request, { timeoutMs: 60_000 })
        .catch((e: unknown) => e);
      await running;
      const stopped = server.shutdown(60_000);
      const refused = await frames
        .calls()
        .acquireLease(request, { timeoutMs: 60_000 })
        .catch((e: unknown) => e);
      expect(refused).toMatchObject({ code: status.UNAVAILABLE, reason: 'SHUTTING_DOWN' });
      release();
      expect(await call).toMatchObject({ lver: 9 });
      await stopped;
      expect(fs.existsSync(framesSocket)).toBe(false);
    } finally {
      frames.close();
      release();
      await server.shutdown(1000);
    }
  });
});
