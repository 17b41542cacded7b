import net from 'node:net';

/**
 * A small NBD client (fixed newstyle negotiation, NBD_OPT_GO, structured replies, meta contexts)
 * over a unix socket, written from the NBD protocol document. sdmesh reads and writes images
 * through qemu (qemu-nbd exporting a volume chain), so a qcow2 volume is read and written as the
 * guest sees it, and zero/allocation/dirty extents come from qemu's block status.
 */

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERROR_BIT = 0x80000000;

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

/** Transmission flags of an export (NBD_FLAG_*). */
export const NBD_FLAG = { READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, SEND_TRIM: 1 << 5, SEND_WRITE_ZEROES: 1 << 6, CAN_MULTI_CONN: 1 << 8 };

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;

const CMD_FLAG_FUA = 1 << 0;
const CMD_FLAG_NO_HOLE = 1 << 1;

const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_OFFSET_HOLE = 2;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR_BIT = 1 << 15;

/** base:allocation status bits. */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;
/** qemu:dirty-bitmap:<name> status bit. */
export const NBD_STATE_DIRTY = 1;

export const BASE_ALLOCATION = 'base:allocation';
export const dirtyBitmapContext = (bitmap: string) => `qemu:dirty-bitmap:${bitmap}`;

/** The largest request this client sends (qemu-nbd accepts 32 MiB). */
export const NBD_MAX_REQUEST = 32 * 1024 * 1024;
/** One write-zeroes request (the length field is 32 bits). */
const ZERO_CHUNK = 1024 * 1024 * 1024;

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

export class NbdError extends Error {
  constructor(
    message: string,
    readonly errno = 0,
  ) {
    super(message);
    this.name = 'NbdError';
  }
}

/** One extent of a block status reply: `flags` are the context's status bits. */
export interface NbdExtent {
  offset: number;
  length: number;
  flags: number;
}

interface Pending {
  /** Read: the destination buffer (filled by OFFSET_DATA chunks, zeroed for holes). */
  buffer?: Buffer;
  /** Read: the [start, end) ranges the reply's chunks filled: they must tile the buffer exactly. */
  filled?: Array<[number, number]>;
  offset: number;
  extents?: Map<number, NbdExtent[]>;
  error?: NbdError;
  resolve: () => void;
  reject: (err: Error) => void;
}

/** Whether ranges cover [0, length) exactly once (no gap, no overlap): a read buffer is then fully written. */
function tiles(ranges: Array<[number, number]>, length: number): boolean {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  let at = 0;
  for (const [start, end] of sorted) {
    if (start !== at || end < start) return false;
    at = end;
  }
  return at === length;
}

/** Bytes arriving on the socket, taken in exact amounts (handshake and replies). */
class ByteQueue {
  private chunks: Buffer[] = [];
  private size = 0;
  private waiter?: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private closed?: Error;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.size += chunk.length;
    this.wake();
  }

  close(err: Error): void {
    this.closed = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(err);
    }
  }

  /** Resolves with exactly n bytes. One taker at a time. */
  take(n: number): Promise<Buffer> {
    if (this.size >= n) return Promise.resolve(this.splice(n));
    if (this.closed) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  /** Copies exactly n bytes into target at `at` (no intermediate buffer: large read payloads). */
  async takeInto(target: Buffer, at: number, n: number): Promise<void> {
    while (n > 0) {
      if (this.size === 0) {
        if (this.closed) throw this.closed;
        // Wait for at least one byte, then copy what is there.
        const one = await this.take(1);
        target[at++] = one[0]!;
        n--;
        continue;
      }
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n);
      c.copy(target, at, 0, k);
      at += k;
      n -= k;
      this.size -= k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
  }

  private wake(): void {
    if (this.waiter && this.size >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(this.splice(w.n));
    }
  }

  private splice(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.size -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.size -= n;
    return out;
  }
}

export interface NbdConnectOptions {
  exportName?: string;
  /** Meta contexts to negotiate (e.g. base:allocation, qemu:dirty-bitmap:b1); ids are looked up by name. */
  metaContexts?: string[];
  signal?: AbortSignal;
}

/**
 * One NBD connection. Requests may be issued concurrently (replies are matched by cookie); the
 * caller bounds how many are in flight, which bounds memory.
 */
export class NbdClient {
  size = 0;
  flags = 0;
  /** Preferred and maximum block sizes the server announced (0: not announced). */
  preferredBlockSize = 0;
  maxBlockSize = 0;
  private readonly contexts = new Map<string, number>();
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private readonly input = new ByteQueue();
  private failure?: Error;
  private readerDone?: Promise<void>;

  private constructor(private readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => this.input.push(chunk));
    socket.on('error', (err) => this.fail(new NbdError(`NBD connection failed: ${err.message}`)));
    socket.on('close', () => this.fail(new NbdError('NBD connection closed')));
  }

  /** Connects to a unix socket and negotiates: fixed newstyle, structured replies, meta contexts, GO. */
  static async connect(socketPath: string, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const socket = net.createConnection({ path: socketPath });
    const onAbort = () => socket.destroy(new Error('NBD connect aborted'));
    opts.signal?.addEventListener('abort', onAbort);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      const client = new NbdClient(socket);
      await client.handshake(opts.exportName ?? '', opts.metaContexts ?? []);
      client.readerDone = client.readReplies();
      return client;
    } catch (err) {
      socket.destroy();
      throw err instanceof NbdError ? err : new NbdError(`cannot connect to the NBD export ${socketPath}: ${(err as Error).message}`);
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  get readOnly(): boolean {
    return (this.flags & NBD_FLAG.READ_ONLY) !== 0;
  }
  get canWriteZeroes(): boolean {
    return (this.flags & NBD_FLAG.SEND_WRITE_ZEROES) !== 0;
  }
  get canFlush(): boolean {
    return (this.flags & NBD_FLAG.SEND_FLUSH) !== 0;
  }
  hasContext(name: string): boolean {
    return this.contexts.has(name);
  }

  private async handshake(exportName: string, metaContexts: string[]): Promise<void> {
    const hello = await this.input.take(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdError('not an NBD newstyle server');
    const serverFlags = hello.readUInt16BE(16);
    if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new NbdError('the NBD server does not speak fixed newstyle');
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    this.socket.write(clientFlags);

    await this.option(OPT_STRUCTURED_REPLY, Buffer.alloc(0), () => undefined);

    if (metaContexts.length) {
      const name = Buffer.from(exportName);
      const queries = metaContexts.map((q) => Buffer.from(q));
      const data = Buffer.alloc(4 + name.length + 4 + queries.reduce((s, q) => s + 4 + q.length, 0));
      let at = data.writeUInt32BE(name.length, 0);
      at += name.copy(data, at);
      at = data.writeUInt32BE(queries.length, at);
      for (const q of queries) {
        at = data.writeUInt32BE(q.length, at);
        at += q.copy(data, at);
      }
      await this.option(OPT_SET_META_CONTEXT, data, (type, payload) => {
        if (type === REP_META_CONTEXT) this.contexts.set(payload.subarray(4).toString(), payload.readUInt32BE(0));
      });
      const missing = metaContexts.filter((c) => !this.contexts.has(c));
      if (missing.length) throw new NbdError(`the NBD export does not offer ${missing.join(', ')}`);
    }

    const name = Buffer.from(exportName);
    const go = Buffer.alloc(4 + name.length + 2 + 2);
    let at = go.writeUInt32BE(name.length, 0);
    at += name.copy(go, at);
    at = go.writeUInt16BE(1, at);
    go.writeUInt16BE(INFO_BLOCK_SIZE, at);
    await this.option(OPT_GO, go, (type, payload) => {
      if (type !== REP_INFO || payload.length < 2) return;
      const info = payload.readUInt16BE(0);
      if (info === INFO_EXPORT && payload.length >= 12) {
        this.size = Number(payload.readBigUInt64BE(2));
        this.flags = payload.readUInt16BE(10);
      } else if (info === INFO_BLOCK_SIZE && payload.length >= 14) {
        this.preferredBlockSize = payload.readUInt32BE(6);
        this.maxBlockSize = payload.readUInt32BE(10);
      }
    });
  }

  /** Sends an option and reads its replies until ACK; an error reply throws. */
  private async option(option: number, data: Buffer, onReply: (type: number, payload: Buffer) => void): Promise<void> {
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(IHAVEOPT, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
    for (;;) {
      const r = await this.input.take(20);
      if (r.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdError('bad NBD option reply magic');
      const type = r.readUInt32BE(12);
      const payload = await this.input.take(r.readUInt32BE(16));
      if (type & REP_ERROR_BIT) {
        throw new NbdError(`the NBD server refused option ${option} (reply ${type - REP_ERROR_BIT}${payload.length ? `: ${payload.toString()}` : ''})`);
      }
      if (type === REP_ACK) return;
      onReply(type, payload);
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.input.close(err);
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  /** Reads replies for the life of the connection, completing requests by cookie. */
  private async readReplies(): Promise<void> {
    try {
      for (;;) {
        const head = await this.input.take(4);
        const magic = head.readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) {
          const rest = await this.input.take(12);
          const p = this.take(rest.readBigUInt64BE(4), true);
          const errno = rest.readUInt32BE(0);
          // Structured replies were negotiated: a read's data never comes in a simple reply (its
          // bytes would follow unframed). A server that does it is not trusted any further.
          if (p?.buffer && !errno) {
            const err = new NbdError('the NBD server answered a read with a simple reply');
            p.reject(err);
            throw err;
          }
          if (errno) p?.reject(new NbdError(`NBD request failed: ${ERRNO_NAMES[errno] ?? `errno ${errno}`}`, errno));
          else p?.resolve();
          continue;
        }
        if (magic !== STRUCTURED_REPLY_MAGIC) throw new NbdError(`bad NBD reply magic 0x${magic.toString(16)}`);
        const rest = await this.input.take(16);
        const flags = rest.readUInt16BE(0);
        const type = rest.readUInt16BE(2);
        const cookie = rest.readBigUInt64BE(4);
        const length = rest.readUInt32BE(12);
        const p = this.pending.get(cookie);
        if (type === REPLY_TYPE_OFFSET_DATA && p?.buffer && length >= 8) {
          // Read data goes straight from the socket's chunks into the caller's buffer.
          const at = Number((await this.input.take(8)).readBigUInt64BE(0)) - p.offset;
          if (at < 0 || at + length - 8 > p.buffer.length) throw new NbdError('NBD read reply outside the requested range');
          await this.input.takeInto(p.buffer, at, length - 8);
          (p.filled ??= []).push([at, at + length - 8]);
        } else {
          const payload = await this.input.take(length);
          if (p) this.chunk(p, type, payload);
        }
        if (flags & REPLY_FLAG_DONE) {
          this.pending.delete(cookie);
          if (p && !p.error && p.buffer && !tiles(p.filled ?? [], p.buffer.length)) {
            const covered = (p.filled ?? []).reduce((sum, [a, b]) => sum + b - a, 0);
            p.error = new NbdError(`NBD read reply chunks covered ${covered} bytes, not the ${p.buffer.length} asked for exactly once`);
          }
          if (p?.error) p.reject(p.error);
          else p?.resolve();
        }
      }
    } catch (err) {
      this.fail(err instanceof Error ? err : new NbdError(String(err)));
    }
  }

  private take(cookie: bigint, done: boolean): Pending | undefined {
    const p = this.pending.get(cookie);
    if (done) this.pending.delete(cookie);
    return p;
  }

  private chunk(p: Pending, type: number, payload: Buffer): void {
    if (type === REPLY_TYPE_NONE) return;
    if (type === REPLY_TYPE_OFFSET_HOLE && p.buffer) {
      const at = Number(payload.readBigUInt64BE(0)) - p.offset;
      const size = payload.readUInt32BE(8);
      if (at < 0 || at + size > p.buffer.length) throw new NbdError('NBD read reply outside the requested range');
      p.buffer.fill(0, at, at + size);
      (p.filled ??= []).push([at, at + size]);
    } else if (type === REPLY_TYPE_BLOCK_STATUS && p.extents) {
      const id = payload.readUInt32BE(0);
      const list = p.extents.get(id) ?? [];
      let offset = list.length ? list[list.length - 1]!.offset + list[list.length - 1]!.length : p.offset;
      for (let at = 4; at + 8 <= payload.length; at += 8) {
        const length = payload.readUInt32BE(at);
        list.push({ offset, length, flags: payload.readUInt32BE(at + 4) });
        offset += length;
      }
      p.extents.set(id, list);
    } else if (type & REPLY_TYPE_ERROR_BIT) {
      const errno = payload.readUInt32BE(0);
      const len = payload.readUInt16BE(4);
      const msg = payload.subarray(6, 6 + len).toString();
      p.error = new NbdError(`NBD request failed: ${ERRNO_NAMES[errno] ?? `errno ${errno}`}${msg ? ` (${msg})` : ''}`, errno);
    }
  }

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    data: Buffer | undefined,
    p: Omit<Pending, 'resolve' | 'reject' | 'offset'> = {},
  ): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const cookie = this.nextCookie++;
    const head = Buffer.alloc(28);
    head.writeUInt32BE(REQUEST_MAGIC, 0);
    head.writeUInt16BE(flags, 4);
    head.writeUInt16BE(type, 6);
    head.writeBigUInt64BE(cookie, 8);
    head.writeBigUInt64BE(BigInt(offset), 16);
    head.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { ...p, offset, resolve, reject });
      this.socket.write(head);
      if (data) this.socket.write(data);
    });
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new NbdError(`range ${offset}+${length} is outside the export (size ${this.size})`);
    }
    if (length > NBD_MAX_REQUEST) throw new NbdError(`request of ${length} bytes is larger than ${NBD_MAX_REQUEST}`);
  }

  /** Reads [offset, offset+length) into a new buffer (holes arrive as zeros). */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    // Not zero-filled: the reply's chunks must fill every byte exactly once, which is checked.
    const buffer = Buffer.allocUnsafe(length);
    if (length) await this.request(CMD_READ, 0, offset, length, undefined, { buffer });
    return buffer;
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    if (data.length) await this.request(CMD_WRITE, opts.fua ? CMD_FLAG_FUA : 0, offset, data.length, data);
  }

  /** Writes zeros; `punchHole` lets the server deallocate (sparse), otherwise it must allocate. */
  async writeZeroes(offset: number, length: number, opts: { punchHole?: boolean; fua?: boolean } = {}): Promise<void> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new NbdError(`range ${offset}+${length} is outside the export (size ${this.size})`);
    }
    const flags = (opts.punchHole === false ? CMD_FLAG_NO_HOLE : 0) | (opts.fua ? CMD_FLAG_FUA : 0);
    // No data crosses the socket: large requests, each within the protocol's 32-bit length.
    for (let at = offset; at < offset + length; at += ZERO_CHUNK) {
      await this.request(CMD_WRITE_ZEROES, flags, at, Math.min(ZERO_CHUNK, offset + length - at), undefined);
    }
  }

  async flush(): Promise<void> {
    await this.request(CMD_FLUSH, 0, 0, 0, undefined);
  }

  /**
   * Block status of one meta context over [offset, offset+length): the extents the server
   * reported, covering at least part of the range (servers may answer short; call again from the end).
   */
  async blockStatus(context: string, offset: number, length: number): Promise<NbdExtent[]> {
    const id = this.contexts.get(context);
    if (id === undefined) throw new NbdError(`meta context ${context} was not negotiated`);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > this.size) throw new NbdError(`range ${offset}+${length} is outside the export`);
    const extents = new Map<number, NbdExtent[]>();
    await this.request(CMD_BLOCK_STATUS, 0, offset, Math.min(length, 0xffffffff - 511), undefined, { extents });
    const list = (extents.get(id) ?? []).filter((e) => e.length > 0);
    // The last extent may reach past the range: clip it.
    const end = offset + length;
    return list.filter((e) => e.offset < end).map((e) => (e.offset + e.length > end ? { ...e, length: end - e.offset } : e));
  }

  /** Every extent of a context over [offset, offset+length), merged where neighbours have the same flags. */
  async extents(context: string, offset = 0, length = this.size - offset): Promise<NbdExtent[]> {
    const out: NbdExtent[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const part = await this.blockStatus(context, at, Math.min(end - at, 1 << 30));
      if (!part.length) throw new NbdError(`the NBD server reported no extents at ${at}`);
      for (const e of part) {
        const last = out[out.length - 1];
        if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
        else out.push({ ...e });
        at = e.offset + e.length;
      }
    }
    return out;
  }

  /** Ends the connection politely (NBD_CMD_DISC), then closes the socket. */
  async close(): Promise<void> {
    if (!this.failure) {
      const head = Buffer.alloc(28);
      head.writeUInt32BE(REQUEST_MAGIC, 0);
      head.writeUInt16BE(CMD_DISC, 6);
      await new Promise<void>((resolve) => this.socket.end(head, () => resolve()));
    }
    this.socket.destroy();
    await this.readerDone;
  }
}
