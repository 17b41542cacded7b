import net from 'node:net';

/** What the proxy does to the next gRPC answer: cut the connection as it comes, or hold it until the client speaks again. */
export type LoseMode = 'drop' | 'hold';

/** An HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id. */
const FRAME_HEADER_BYTES = 9;
const FRAME_TYPE_HEADERS = 0x1;
const FRAME_TYPE_RST_STREAM = 0x3;
/** What an HTTP/2 client sends first, before its frames. */
const CLIENT_PREFACE = 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n';

/**
 * A proxy between a gRPC client and a server on unix sockets that loses the answer of one call:
 * it follows the server's HTTP/2 frames and, once armed, takes the first HEADERS frame of a stream
 * (a call's answer beginning) as the moment to lose it. `drop` closes both connections there
 * (the client's call ends UNAVAILABLE); `hold` forwards nothing more from the server and closes
 * both connections when the client next sends anything (the RST_STREAM of its deadline: the call
 * ends DEADLINE_EXCEEDED). The server has answered either way, so it undoes nothing itself. Later
 * connections pass through untouched. The proxy runs in the test process: the server sees the
 * test process as the caller (a lease-manager then accepts calls for the test's child processes).
 */
export class AnswerLosingProxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private armed?: LoseMode;
  /** Answers lost so far that came while their client still waited (a grant the client never learned of). */
  lost = 0;

  private constructor(
    readonly socketPath: string,
    private readonly target: string,
  ) {
    this.server = net.createServer((client) => this.pipe(client));
  }

  static async start(socketPath: string, target: string): Promise<AnswerLosingProxy> {
    const proxy = new AnswerLosingProxy(socketPath, target);
    await new Promise<void>((resolve, reject) => {
      proxy.server.once('error', reject);
      proxy.server.listen(socketPath, resolve);
    });
    return proxy;
  }

  /** `unix:<path>`, for a gRPC client. */
  get address(): string {
    return `unix:${this.socketPath}`;
  }

  /** The next answer any connection carries is lost this way. */
  loseNextAnswer(mode: LoseMode): void {
    this.armed = mode;
  }

  private pipe(client: net.Socket): void {
    const server = net.connect(this.target);
    for (const s of [client, server]) {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
      s.on('error', () => undefined);
    }
    const closeBoth = () => {
      client.destroy();
      server.destroy();
    };
    client.on('close', () => server.destroy());
    server.on('close', () => client.destroy());
    let holding = false;
    /** The client cancelled a call on this connection (its deadline passed): an answer after that is no lost grant. */
    let clientCancelled = false;
    client.on(
      'data',
      frames(CLIENT_PREFACE.length, (frame, type) => {
        if (holding) return closeBoth();
        if (type === FRAME_TYPE_RST_STREAM) clientCancelled = true;
        server.write(frame);
      }),
    );
    server.on(
      'data',
      frames(0, (frame, type, stream) => {
        if (holding) return;
        if (this.armed && type === FRAME_TYPE_HEADERS && stream > 0) {
          const mode = this.armed;
          this.armed = undefined;
          if (!clientCancelled) this.lost++;
          if (mode === 'drop') closeBoth();
          else holding = true;
          return;
        }
        client.write(frame);
      }),
    );
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * A data handler that cuts one direction of an HTTP/2 connection into whole frames (after `skip`
 * bytes passed through as one piece), so that a frame to lose is never half forwarded.
 */
function frames(skip: number, onFrame: (frame: Buffer, type: number, stream: number) => void): (d: Buffer) => void {
  let pending = Buffer.alloc(0);
  let toSkip = skip;
  return (d) => {
    pending = Buffer.concat([pending, d]);
    if (toSkip) {
      if (pending.length < toSkip) return;
      onFrame(pending.subarray(0, toSkip), -1, 0);
      pending = pending.subarray(toSkip);
      toSkip = 0;
    }
    while (pending.length >= FRAME_HEADER_BYTES) {
      const end = FRAME_HEADER_BYTES + pending.readUIntBE(0, 3);
      if (pending.length < end) break;
      onFrame(pending.subarray(0, end), pending[3]!, pending.readUInt32BE(5) & 0x7fffffff);
      pending = pending.subarray(end);
    }
  };
}
