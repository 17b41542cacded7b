import * as grpc from '@grpc/grpc-js';
import { SdmeshError } from './errors';
import { deadlineOf, type CallOptions } from './grpc-client';
import { retry, type RetryPolicy } from './retry';

/**
 * A call to this host's lease-manager that met UNAVAILABLE: the lease-manager is not there
 * (killed and restarting, its container restarted, an upgrade) or went away during the call. It
 * never answers UNAVAILABLE itself, so nothing else is meant. Tried again for as long as a
 * supervised restart takes under load: in the chaos runs of session 7 a lease-manager answered
 * again 4.5–16 s after its kill (0.5–4.5 s of restart delay, then loading; load averages 10–40).
 */
export const LEASE_MANAGER_RESTART: RetryPolicy = {
  totalMs: 20_000,
  initialBackoffMs: 100,
  maxBackoffMs: 1000,
  retryable: (err) => SdmeshError.from(err).code === grpc.status.UNAVAILABLE,
};

/**
 * The channel options of a client of the host-local lease API: after a refused connection, grpc-js
 * waits 1 s, then 1.6 s, 2.6 s ... up to 2 min before it connects again, and fails every call
 * meanwhile at once; a unix socket on this host costs nothing to try, so a restarted
 * lease-manager is reached within a second of listening.
 */
export const LOCAL_LEASE_CHANNEL_OPTIONS = {
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
};

/**
 * Runs a lease-manager call, and again while it fails UNAVAILABLE (LEASE_MANAGER_RESTART), within
 * the caller's deadline (`timeoutMs` counts from the first try) and until its signal aborts. Each
 * try gets the options with that one deadline. `alsoRetry` names other failures worth another try.
 * Only for calls that may be made twice: a try that failed may have been done all the same.
 */
export function untilLeaseManagerAnswers<T>(
  call: (opts: CallOptions) => Promise<T>,
  opts: CallOptions,
  hooks: { onRetry?: (err: unknown, attempt: number, waitMs: number) => void; alsoRetry?: (err: unknown) => boolean } = {},
): Promise<T> {
  const at = deadlineOf(opts);
  const deadline = at === undefined ? undefined : new Date(at);
  const each: CallOptions = { ...opts, timeoutMs: undefined, deadline };
  const policy: RetryPolicy = {
    ...LEASE_MANAGER_RESTART,
    totalMs: Math.min(LEASE_MANAGER_RESTART.totalMs, deadline ? deadline.getTime() - Date.now() : Infinity),
    retryable: (err) => LEASE_MANAGER_RESTART.retryable(err) || !!hooks.alsoRetry?.(err),
  };
  // A timer fires late, so the last wait can end past the deadline: no try starts then (it could
  // only fail DEADLINE_EXCEEDED); the caller gets the UNAVAILABLE that made it wait.
  let lastErr: unknown;
  const tryOnce = async (attempt: number): Promise<T> => {
    if (attempt > 1 && deadline && Date.now() >= deadline.getTime()) throw lastErr;
    try {
      return await call(each);
    } catch (err) {
      lastErr = err;
      throw err;
    }
  };
  return retry(policy, tryOnce, { signal: opts.signal, onRetry: hooks.onRetry });
}
