/**
 * At most one write per interval, and the last value of a burst written when the interval is
 * over (trailing edge): a job reporting progress many times a second costs one KV write and
 * one event a second, and the newest value always lands — also when the job then goes quiet
 * or ends within the second (dropping it would leave the operation at its first value).
 */
export class ProgressThrottle<T> {
  private lastWriteMs = 0;
  private pending?: { value: T };
  private timer?: NodeJS.Timeout;
  private inFlight: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(
    private readonly write: (value: T) => Promise<void>,
    private readonly onError: (err: unknown) => void,
    private readonly intervalMs = 1000,
  ) {}

  /** Writes now if the interval has passed (awaited), else keeps the value for the trailing write. */
  async offer(value: T): Promise<void> {
    if (this.closed) return;
    const waitMs = this.lastWriteMs + this.intervalMs - Date.now();
    if (waitMs <= 0 && !this.timer) return this.writeNow(value);
    this.pending = { value };
    this.timer ??= setTimeout(
      () => {
        this.timer = undefined;
        const p = this.pending;
        this.pending = undefined;
        if (p && !this.closed) void this.writeNow(p.value).catch(this.onError);
      },
      Math.max(0, waitMs),
    );
  }

  /** Drops what is pending and waits for a write under way: after this, nothing more is written. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.pending = undefined;
    await this.inFlight.catch(() => undefined);
  }

  private writeNow(value: T): Promise<void> {
    this.lastWriteMs = Date.now();
    const p = this.inFlight.catch(() => undefined).then(() => this.write(value));
    this.inFlight = p;
    return p;
  }
}
