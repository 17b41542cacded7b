/**
 * The host-local lease frame protocol (issue 17: the lease path's tail): the lease calls a
 * LeaseHolder makes per hold, as length-prefixed frames on a unix socket of the lease-manager's
 * instead of gRPC. The messages are the proto contract's (ts-proto); only the framing is ours.
 * Why, and what it authenticates: docs/lease-binding.md, "The lease frame socket".
 *
 * Every frame: a fixed header of HEADER_BYTES, then `length` bytes of body.
 *
 *   u32 length     body bytes (≤ MAX_FRAME_BODY; more closes the connection)
 *   u32 call id    chosen by the client, unique among its calls in flight on the connection
 *   u8  kind       FrameKind
 *   u8  arg        REQUEST: the method's id (FRAME_METHODS); ERROR: the gRPC status code; else 0
 *   u32 deadline   REQUEST: ms the client waits from sending (0: no deadline); else 0
 *
 * Bodies: REQUEST the method's request message, REPLY its response message, ERROR the JSON
 * `{ "reason": ..., "message": ... }` of the SdmeshError, CANCEL empty. All integers big-endian.
 */
import { status } from '@grpc/grpc-js';
import path from 'node:path';

export const HEADER_BYTES = 14;
/** Largest request (or CANCEL) body: an AcquireLeases of 8 leases with 8 notices is ≈ 4 KiB. */
export const MAX_FRAME_BODY = 64 * 1024;
/**
 * Largest answer (REPLY or ERROR) body: an answer may be larger than its request (AcquireLeases
 * repeats the operation id in every Lease), and one refused for its size would come after the
 * grant. The grpc-js client's default receive limit, as on the gRPC socket.
 */
export const MAX_REPLY_BODY = 4 * 1024 * 1024;
/** Answers a connection may leave unsent (its peer not reading) before the server stops reading its requests. */
export const MAX_UNSENT_ANSWER_BYTES = 1024 * 1024;
/** Calls one connection may have in flight at once; one more closes it. */
export const MAX_CALLS_IN_FLIGHT = 256;

export enum FrameKind {
  REQUEST = 1,
  REPLY = 2,
  ERROR = 3,
  CANCEL = 4,
}

/**
 * The methods served on the frame socket, by id (index + 1): what a LeaseHolder calls per hold,
 * its join of a lockspace, and GetLockspace (a call without sanlock work, for measuring the hop).
 * Append only: an id never changes meaning.
 */
export const FRAME_METHODS = [
  'sdmesh.v1.LeaseManagerService/AcquireLease',
  'sdmesh.v1.LeaseManagerService/AcquireLeases',
  'sdmesh.v1.LeaseManagerService/ReleaseLease',
  'sdmesh.v1.LeaseManagerService/JoinLockspace',
  'sdmesh.v1.LeaseManagerService/GetLockspace',
] as const;
export type FrameMethod = (typeof FRAME_METHODS)[number];

export const frameMethodId = (method: FrameMethod): number => FRAME_METHODS.indexOf(method) + 1;
export const frameMethodOf = (id: number): FrameMethod | undefined => FRAME_METHODS[id - 1];

export interface Frame {
  callId: number;
  kind: FrameKind;
  arg: number;
  deadlineMs: number;
  body: Buffer;
}

export function encodeFrame(f: Omit<Frame, 'body'> & { body?: Uint8Array }): Buffer {
  const body = f.body ?? new Uint8Array(0);
  const limit = f.kind === FrameKind.REPLY || f.kind === FrameKind.ERROR ? MAX_REPLY_BODY : MAX_FRAME_BODY;
  if (body.length > limit) throw new FrameError(`frame body of ${body.length} bytes is over the limit of ${limit}`);
  const out = Buffer.allocUnsafe(HEADER_BYTES + body.length);
  out.writeUInt32BE(body.length, 0);
  out.writeUInt32BE(f.callId, 4);
  out.writeUInt8(f.kind, 8);
  out.writeUInt8(f.arg, 9);
  out.writeUInt32BE(f.deadlineMs, 10);
  out.set(body, HEADER_BYTES);
  return out;
}

/** A frame that breaks the protocol: the connection it came on is closed. */
export class FrameError extends Error {
  override name = 'FrameError';
}

/**
 * Cuts a byte stream into frames. Throws FrameError for a header announcing more than `maxBody`
 * (the server: MAX_FRAME_BODY; the client, reading answers: MAX_REPLY_BODY) or an unknown kind,
 * before waiting for (or buffering) such a body.
 */
export class FrameReader {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** Bytes the frame begun needs in all: until they are here its chunks are not joined again (a peer trickling bytes costs no copying per byte). */
  private needed = HEADER_BYTES;

  constructor(private readonly maxBody = MAX_FRAME_BODY) {}

  push(chunk: Buffer): Frame[] {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    const frames: Frame[] = [];
    while (this.pendingBytes >= this.needed) {
      const buf = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending, this.pendingBytes);
      const length = buf.readUInt32BE(0);
      if (length > this.maxBody) throw new FrameError(`frame body of ${length} bytes announced, over the limit of ${this.maxBody}`);
      const kind = buf.readUInt8(8);
      if (!(kind in FrameKind)) throw new FrameError(`unknown frame kind ${kind}`);
      if (buf.length < HEADER_BYTES + length) {
        this.pending = [buf];
        this.needed = HEADER_BYTES + length;
        break;
      }
      this.needed = HEADER_BYTES;
      frames.push({
        callId: buf.readUInt32BE(4),
        kind,
        arg: buf.readUInt8(9),
        deadlineMs: buf.readUInt32BE(10),
        // A copy: the body outlives the read buffer it came in (decoded later, kept by the handler).
        body: Buffer.from(buf.subarray(HEADER_BYTES, HEADER_BYTES + length)),
      });
      const rest = buf.subarray(HEADER_BYTES + length);
      this.pending = rest.length ? [rest] : [];
      this.pendingBytes = rest.length;
    }
    return frames;
  }
}

/** The body of an ERROR frame. */
export function encodeErrorBody(reason: string, message: string): Buffer {
  return Buffer.from(JSON.stringify({ reason, message: message.slice(0, 8192) }));
}

export function decodeErrorBody(code: number, body: Buffer): { code: number; reason?: string; message: string } {
  try {
    const parsed = JSON.parse(body.toString('utf8')) as { reason?: unknown; message?: unknown };
    return { code, reason: typeof parsed.reason === 'string' ? parsed.reason : undefined, message: String(parsed.message ?? status[code]) };
  } catch {
    return { code, message: `${status[code] ?? 'UNKNOWN'} (undecodable error body)` };
  }
}

/** Longest timer Node keeps (a longer one fires after 1 ms): a deadline further away needs no timer. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * The frame socket next to the lease-manager's gRPC socket: `/run/sdmesh/lease-manager.sock` →
 * `/run/sdmesh/lease-manager.frames.sock`. Clients find it from the gRPC address they are given.
 */
export function leaseFramesSocketPath(grpcSocketPath: string): string {
  const dir = path.dirname(grpcSocketPath);
  const base = path.basename(grpcSocketPath).replace(/\.sock$/, '');
  return path.join(dir, `${base}.frames.sock`);
}
