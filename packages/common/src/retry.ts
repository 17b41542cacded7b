import { SdmeshError } from './errors';

/**
 * How a call is retried, as data next to the code that uses it (in the spirit of temporal's
 * activity retry options): how long in all, how the wait between attempts grows, and which
 * failures are worth another attempt. Everything else fails at once.
 */
export interface RetryPolicy {
  /** Give up this long after the first attempt started (the last error is thrown). */
  totalMs: number;
  /** Wait before the second attempt; doubled after each attempt up to maxBackoffMs. */
  initialBackoffMs: number;
  maxBackoffMs: number;
  /** At most this many attempts (default: unlimited within totalMs). */
  maxAttempts?: number;
  /** Which errors are worth another attempt. */
  retryable: (err: unknown) => boolean;
}

export interface RetryOptions {
  /** Stops waiting and retrying; the signal's reason is thrown. */
  signal?: AbortSignal;
  /** Called before each wait (for a log line). */
  onRetry?: (err: unknown, attempt: number, waitMs: number) => void;
  /** For tests: the clock and the sleep. */
  now?: () => number;
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** Sleeps ms, or rejects with the signal's reason when it aborts first. */
export function sleepUnlessAborted(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.reject(SdmeshError.from(signal.reason));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(SdmeshError.from(signal!.reason));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * Runs fn until it succeeds, fails with an error the policy does not retry, or the policy's
 * time or attempts run out (then the last error is thrown). Backoff doubles with ±20 % jitter,
 * so replicas retrying the same thing spread out; a wait never runs past totalMs.
 */
export async function retry<T>(policy: RetryPolicy, fn: (attempt: number) => Promise<T>, opts: RetryOptions = {}): Promise<T> {
  const now = opts.now ?? Date.now;
  const sleep = opts.sleep ?? sleepUnlessAborted;
  const until = now() + policy.totalMs;
  let backoff = policy.initialBackoffMs;
  for (let attempt = 1; ; attempt++) {
    if (opts.signal?.aborted) throw SdmeshError.from(opts.signal.reason);
    try {
      return await fn(attempt);
    } catch (err) {
      const left = until - now();
      if (!policy.retryable(err) || left <= 0 || (policy.maxAttempts !== undefined && attempt >= policy.maxAttempts)) throw err;
      const waitMs = Math.max(0, Math.min(left, Math.round(backoff * (0.8 + 0.4 * Math.random()))));
      opts.onRetry?.(err, attempt, waitMs);
      await sleep(waitMs, opts.signal);
      backoff = Math.min(policy.maxBackoffMs, backoff * 2);
    }
  }
}
