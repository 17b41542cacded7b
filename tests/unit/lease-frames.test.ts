import net from 'node:net';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import {
  encodeFrame,
  failedPrecondition,
  FrameError,
  FrameKind,
  FrameReader,
  frameMethodId,
  HEADER_BYTES,
  LeaseFramesClient,
  leaseFramesSocketPath,
  localLeaseManagerClient,
  MAX_FRAME_BODY,
  pb,
  SdmeshError,
  ServiceMetrics,
  type CallContext,
  type Frame,
  type LeaseCalls,
} from '@sdmesh/common/internal';
import { leaseFramesTestServer, recordingLog } from '../harness/lease-frames-server';
import { makeTestDir, removeTestDir } from '../harness/paths';

describe('lease frames: framing', () => {
  const frame = (callId: number, body: string) => encodeFrame({ callId, kind: FrameKind.REQUEST, arg: 1, deadlineMs: 250, body: Buffer.from(body) });

  it('cuts frames out of a stream however it is split', () => {
    const bytes = Buffer.concat([frame(1, 'first'), frame(2, ''), frame(3, 'third body')]);
    for (const step of [1, 5, HEADER_BYTES, 17, bytes.length]) {
      const reader = new FrameReader();
      const got = [];
      for (let i = 0; i < bytes.length; i += step) got.push(...reader.push(bytes.subarray(i, i + step)));
      expect(got.map((f) => [f.callId, f.kind, f.arg, f.deadlineMs, f.body.toString()])).toEqual([
        [1, FrameKind.REQUEST, 1, 250, 'first'],
        [2, FrameKind.REQUEST, 1, 250, ''],
        [3, FrameKind.REQUEST, 1, 250, 'third body'],
      ]);
    }
  });

  it('refuses a header announcing more than the limit before its body comes, and an unknown kind', () => {
    const oversize = Buffer.alloc(HEADER_BYTES);
    oversize.writeUInt32BE(MAX_FRAME_BODY + 1, 0);
    oversize.writeUInt8(FrameKind.REQUEST, 8);
    expect(() => new FrameReader().push(oversize)).toThrow(FrameError);
    const badKind = frame(1, 'x');
    badKind.writeUInt8(9, 8);
    expect(() => new FrameReader().push(badKind)).toThrow(/unknown frame kind 9/);
    expect(() => encodeFrame({ callId: 1, kind: FrameKind.REQUEST, arg: 0, deadlineMs: 0, body: Buffer.alloc(MAX_FRAME_BODY + 1) })).toThrow(FrameError);
  });

  it('derives the frame socket from the gRPC socket', () => {
    expect(leaseFramesSocketPath('/run/sdmesh/lease-manager.sock')).toBe('/run/sdmesh/lease-manager.frames.sock');
  });
});

/**
 * A GrpcServer serving a LeaseManagerService whose handlers the test controls, on its gRPC unix
 * socket and its lease frame socket; the client is this process (a local peer, SO_PEERCRED).
 */
describe('lease frames: server and client', () => {
  const dir = makeTestDir('lease-frames');
  const grpcSocket = path.join(dir, 'run', 'lease-manager.sock');
  const framesSocket = leaseFramesSocketPath(grpcSocket);
  const { log, warnings, audits } = recordingLog();
  const metrics = new ServiceMetrics('test');
  /** What the handler of the next AcquireLease does. */
  let acquire: (req: pb.AcquireLeaseRequest, ctx: CallContext) => Promise<pb.Lease>;
  const server = leaseFramesTestServer({ grpcSocket, framesSocket, log, metrics, handlers: { acquireLease: (req, ctx) => acquire(req, ctx) } });
  const grpcClient = localLeaseManagerClient(`unix:${grpcSocket}`);
  const frames = new LeaseFramesClient(framesSocket, grpcClient);
  const calls = frames.calls();
  const location = { lockspace: 'ls', resource: 'r1', path: '/var/lib/sdmesh/d/dom_md/leases', offset: 1048576 };
  const request = { lease: location, mode: pb.LeaseMode.LEASE_MODE_EXCLUSIVE, holderPid: process.pid, operationId: 'op-1' };

  beforeAll(() => server.start());
  afterAll(async () => {
    frames.close();
    grpcClient.close();
    await server.shutdown(1000);
    removeTestDir(dir);
  });

  /** A raw connection to the frame socket; resolves with what it received once the server closes it. */
  const raw = (bytes: Buffer) =>
    new Promise<Buffer>((resolve) => {
      const got: Buffer[] = [];
      const s = net.connect(framesSocket, () => s.write(bytes));
      s.on('data', (d) => got.push(d));
      s.on('error', () => undefined);
      s.on('close', () => resolve(Buffer.concat(got)));
    });

  /** The first frame the server sends back on a raw connection that wrote these bytes. */
  const firstAnswer = (bytes: Buffer) =>
    new Promise<Frame>((resolve) => {
      const reader = new FrameReader();
      const s = net.connect(framesSocket, () => s.write(bytes));
      s.on('data', (d) => {
        const [frame] = reader.push(d);
        if (!frame) return;
        resolve(frame);
        s.destroy();
      });
    });

  it('answers like gRPC: the same handler, caller (SO_PEERCRED), audit and metrics', async () => {
    const seen: CallContext['identity'][] = [];
    acquire = async (req, ctx) => {
      seen.push(ctx.identity);
      return pb.Lease.fromPartial({ location: req.lease, mode: req.mode, holderPid: req.holderPid, lver: 7, acquireTime: new Date(1000), hostId: 3 });
    };
    const [viaFrames, viaGrpc] = [await calls.acquireLease(request, { timeoutMs: 10_000 }), await grpcClient.acquireLease(request, { timeoutMs: 10_000 })];
    expect(viaFrames).toEqual(viaGrpc);
    expect(viaFrames).toMatchObject({ location, lver: 7, holderPid: process.pid, hostId: 3 });
    expect(seen).toEqual([
      { kind: 'local', pid: process.pid, uid: process.getuid!() },
      { kind: 'local', pid: process.pid, uid: process.getuid!() },
    ]);
    expect(audits.slice(-2)).toEqual([
      expect.objectContaining({ who: `local pid ${process.pid}`, method: 'sdmesh.v1.LeaseManagerService/AcquireLease', outcome: 'OK' }),
      expect.objectContaining({ who: `local pid ${process.pid}`, method: 'sdmesh.v1.LeaseManagerService/AcquireLease', outcome: 'OK' }),
    ]);
    expect(await metrics.registry.metrics()).toMatch(
      /sdmesh_grpc_server_handled_total\{[^}]*method="LeaseManagerService\/AcquireLease"[^}]*code="OK"[^}]*\} 2/,
    );
  });

  it("passes the lease-manager's errors through with code, reason and message", async () => {
    acquire = async () => {
      throw failedPrecondition('lockspace "ls" is not joined on this host', 'LOCKSPACE_NOT_JOINED');
    };
    const err = await calls.acquireLease(request).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SdmeshError);
    expect(err).toMatchObject({ code: status.FAILED_PRECONDITION, reason: 'LOCKSPACE_NOT_JOINED', message: 'lockspace "ls" is not joined on this host' });
    // A method the frame socket does not carry goes nowhere near it; an undecodable request is INVALID_ARGUMENT, as on gRPC.
    const undecodable = encodeFrame({
      callId: 5,
      kind: FrameKind.REQUEST,
      arg: frameMethodId('sdmesh.v1.LeaseManagerService/AcquireLease'),
      deadlineMs: 0,
      body: Buffer.from([0xff, 0xff, 0xff]),
    });
    const got = await firstAnswer(undecodable);
    expect([got!.callId, got!.kind, got!.arg]).toEqual([5, FrameKind.ERROR, status.INVALID_ARGUMENT]);
  });

  it('deadline: the client gives up DEADLINE_EXCEEDED and the handler sees its signal abort', async () => {
    let aborted: Promise<unknown> | undefined;
    acquire = (_req, ctx) => {
      aborted = new Promise((resolve) => ctx.signal.addEventListener('abort', () => resolve(SdmeshError.from(ctx.signal.reason).code)));
      return new Promise(() => undefined);
    };
    const err = await calls.acquireLease(request, { timeoutMs: 300 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: status.DEADLINE_EXCEEDED });
    // Aborted by the server's own deadline timer or by the client's CANCEL, whichever came first.
    expect([status.DEADLINE_EXCEEDED, status.CANCELLED]).toContain(await aborted);
  });

  it("cancel: the client's signal ends the call CANCELLED and cancels the handler", async () => {
    let aborted: Promise<unknown> | undefined;
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    acquire = (_req, ctx) => {
      aborted = new Promise((resolve) => ctx.signal.addEventListener('abort', () => resolve(SdmeshError.from(ctx.signal.reason).code)));
      started();
      return new Promise(() => undefined);
    };
    const controller = new AbortController();
    const call = calls.acquireLease(request, { signal: controller.signal }).catch((e: unknown) => e);
    await running;
    controller.abort();
    expect(await call).toMatchObject({ code: status.CANCELLED });
    expect(await aborted).toBe(status.CANCELLED);
  });

  it('a malformed or oversize frame closes that connection (logged); the server goes on serving', async () => {
    const oversize = Buffer.alloc(HEADER_BYTES);
    oversize.writeUInt32BE(MAX_FRAME_BODY + 1, 0);
    oversize.writeUInt8(FrameKind.REQUEST, 8);
    const garbage = Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    const reply = encodeFrame({ callId: 1, kind: FrameKind.REPLY, arg: 0, deadlineMs: 0 });
    const twice = Buffer.concat(
      [1, 1].map((id) =>
        encodeFrame({
          callId: id,
          kind: FrameKind.REQUEST,
          arg: 1,
          deadlineMs: 0,
          body: pb.AcquireLeaseRequest.encode(pb.AcquireLeaseRequest.fromPartial(request)).finish(),
        }),
      ),
    );
    acquire = () => new Promise(() => undefined);
    const before = warnings.length;
    for (const bytes of [oversize, garbage, reply, twice]) expect((await raw(bytes)).length).toBe(0);
    expect(warnings.slice(before)).toEqual(Array(4).fill('lease frame connection closed: protocol violation'));
    acquire = async (req) => pb.Lease.fromPartial({ location: req.lease, lver: 1 });
    expect(await calls.acquireLease(request)).toMatchObject({ lver: 1 });
  });

  it('a method it does not serve answers UNIMPLEMENTED', async () => {
    const got = await firstAnswer(encodeFrame({ callId: 9, kind: FrameKind.REQUEST, arg: 200, deadlineMs: 0 }));
    expect([got!.callId, got!.kind, got!.arg]).toEqual([9, FrameKind.ERROR, status.UNIMPLEMENTED]);
  });

  it('a connection closed during a call: UNAVAILABLE at the client; no frame socket: the fallback answers', async () => {
    const closing = path.join(dir, 'closing.sock');
    const closer = net.createServer((s) => s.once('data', () => s.destroy()));
    await new Promise<void>((r) => closer.listen(closing, r));
    const fallback = { acquireLease: async () => pb.Lease.fromPartial({ lver: 99 }) } as unknown as LeaseCalls;
    try {
      const err = await new LeaseFramesClient(closing, fallback)
        .calls()
        .acquireLease(request)
        .catch((e: unknown) => e);
      expect(err).toMatchObject({ code: status.UNAVAILABLE });
    } finally {
      closer.close();
    }
    expect(await new LeaseFramesClient(path.join(dir, 'nobody.sock'), fallback).calls().acquireLease(request)).toMatchObject({ lver: 99 });
  });

  it('no frame socket: the calls right after a refused connect go to the fallback without trying the socket again', async () => {
    const fallback = { acquireLease: async () => pb.Lease.fromPartial({ lver: 7 }) } as unknown as LeaseCalls;
    const calls = new LeaseFramesClient(path.join(dir, 'nobody-either.sock'), fallback).calls();
    const connect = jest.spyOn(net, 'connect');
    try {
      for (let i = 0; i < 3; i++) expect(await calls.acquireLease(request)).toMatchObject({ lver: 7 });
      expect(connect).toHaveBeenCalledTimes(1);
    } finally {
      connect.mockRestore();
    }
  });
});
