/**
 * Operation fences on storage (docs/storage-format.md, "Operation fences"): the name of a fence and
 * when it expires. Written by metadata-tx's FenceOperation (services/metadata-tx/src/operation-fences.ts),
 * removed once expired by the next FenceOperation of the domain and by the GC's passes, both under the
 * domain metadata lease: one parser and one expiry rule for the two.
 */

/** How long a fence is kept (ms) unless a service is told otherwise. */
export const DEFAULT_FENCE_RETENTION_MS = 24 * 3600_000;

const FENCE_NAME = /^fence_([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})_(\d{1,15})$/;

export interface FenceName {
  name: string;
  operationId: string;
  /** When it was written (epoch ms, the writer's clock). */
  fencedMs: number;
}

export const fenceFileName = (operationId: string, fencedMs: number): string => `fence_${operationId}_${fencedMs}`;

/** A dom_md entry name as a fence (exactly `fence_<lowercase uuid>_<1-15 digits>`), or undefined when it is not one. */
export function parseFenceName(name: string): FenceName | undefined {
  const m = FENCE_NAME.exec(name);
  if (!m) return undefined;
  const fencedMs = Number(m[2]);
  return Number.isSafeInteger(fencedMs) ? { name, operationId: m[1]!, fencedMs } : undefined;
}

/**
 * Whether a fence written at fencedMs has expired at nowMs: older than the retention, by the time in
 * its name (the hosts' clocks are assumed to agree within the retention). A fence from the future is
 * not expired.
 */
export function isFenceExpired(fencedMs: number, nowMs: number, retentionMs: number = DEFAULT_FENCE_RETENTION_MS): boolean {
  return nowMs - fencedMs > retentionMs;
}
