import {
  checkRef,
  failedPrecondition,
  invalidArgument,
  openVolumeChain,
  resolveVolume,
  Reason,
  type OpenedChain,
  type ResolvedVolume,
} from '@sdmesh/common/worker';

// Reading and opening volumes moved to @sdmesh/common (storage/volume-chain.ts: the CSI node uses them too).
export { checkRef, openVolumeChain, resolveVolume };
export type { OpenedChain, ResolvedVolume };

/** A template is read-only for good: no copy, import or other write job may target it. */
function refuseTemplateDestination(destination: ResolvedVolume): void {
  if (destination.record.template) {
    throw failedPrecondition(`destination volume ${destination.volumeId} is a template (read-only): refusing to write it`, Reason.DISK_IS_TEMPLATE);
  }
}

export interface CopyPlan {
  source: ResolvedVolume;
  destination: ResolvedVolume;
  /** Keep the destination's backing file (copy only the source's own layer). */
  keepBacking: boolean;
}

/**
 * Checks a copy against the volumes as they are now. Called by the service before it accepts
 * a job (so bad requests fail at once, nothing written) and again by the worker under the
 * leases (where it counts). Status codes:
 * - same volume → INVALID_ARGUMENT SAME_VOLUME
 * - source (or, when collapsing, an ancestor) ILLEGAL → FAILED_PRECONDITION SOURCE_ILLEGAL
 * - destination smaller than source → FAILED_PRECONDITION DESTINATION_TOO_SMALL
 * - destination is the parent of another volume → FAILED_PRECONDITION DESTINATION_HAS_CHILDREN (unless it is
 *   ILLEGAL: a chain a copy is building)
 * - destination is a template → FAILED_PRECONDITION DISK_IS_TEMPLATE
 * - keep-chain copy of a volume with a parent onto a volume without one → FAILED_PRECONDITION DESTINATION_CHAIN_MISMATCH
 * - generation differs → FAILED_PRECONDITION GENERATION_MISMATCH
 */
export function checkCopy(source: ResolvedVolume, destination: ResolvedVolume, opts: { collapse: boolean; destinationGeneration: number }): CopyPlan {
  if (source.domain.id === destination.domain.id && source.volumeId === destination.volumeId) {
    throw invalidArgument(`source and destination are the same volume ${source.volumeId} of domain ${source.domain.id}`, Reason.SAME_VOLUME);
  }
  refuseTemplateDestination(destination);
  const readChain = opts.collapse ? [source.record, ...source.ancestors] : [source.record];
  const illegal = readChain.find((r) => r.legality !== 'LEGAL');
  if (illegal) {
    const which = illegal === source.record ? `source volume ${illegal.volumeId}` : `ancestor ${illegal.volumeId} of source volume ${source.volumeId}`;
    throw failedPrecondition(`${which} is ILLEGAL (being written or left half-written): refusing to copy it`, Reason.SOURCE_ILLEGAL);
  }
  if (destination.record.capacityBytes < source.record.capacityBytes) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} (${destination.record.capacityBytes} bytes) is smaller than source volume ${source.volumeId} (${source.record.capacityBytes} bytes)`,
      Reason.DESTINATION_TOO_SMALL,
    );
  }
  // A chain being built by a copy (every target volume created ILLEGAL, parent first, then each
  // filled by its own job at once: issue 17) may fill a parent that is still ILLEGAL: no guest
  // view goes through it until its own job makes it LEGAL, whatever its children are (a child's
  // job may have ended first: a parent copy retried after its host died finds it LEGAL). A LEGAL
  // parent is part of a readable chain: writing it would corrupt its children.
  if (destination.children.length && destination.record.legality !== 'ILLEGAL') {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} is the parent of ${destination.children.join(', ')}: writing it would corrupt them`,
      Reason.DESTINATION_HAS_CHILDREN,
    );
  }
  const keepBacking = !opts.collapse && source.record.parentId !== '';
  if (keepBacking && destination.record.parentId === '') {
    throw failedPrecondition(
      `source volume ${source.volumeId} has a parent and collapse is false, but destination volume ${destination.volumeId} has no backing volume to keep: ` +
        'copy with collapse=true, or create the destination as a snapshot of a copy of the source parent',
      Reason.DESTINATION_CHAIN_MISMATCH,
    );
  }
  if (destination.record.generation !== opts.destinationGeneration) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} is at generation ${destination.record.generation}, the request expected ${opts.destinationGeneration}`,
      Reason.GENERATION_MISMATCH,
    );
  }
  return { source, destination, keepBacking };
}

/**
 * Checks an import (a host file into a volume): the destination must be a base volume (the
 * file is flattened into it), large enough, nobody's parent, at the expected generation.
 */
export function checkImport(file: { path: string; virtualSize: number }, destination: ResolvedVolume, opts: { destinationGeneration: number }): void {
  refuseTemplateDestination(destination);
  if (destination.record.capacityBytes < file.virtualSize) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} (${destination.record.capacityBytes} bytes) is smaller than source file ${file.path} (${file.virtualSize} bytes)`,
      Reason.DESTINATION_TOO_SMALL,
    );
  }
  if (destination.children.length) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} is the parent of ${destination.children.join(', ')}: writing it would corrupt them`,
      Reason.DESTINATION_HAS_CHILDREN,
    );
  }
  if (destination.record.parentId !== '') {
    throw failedPrecondition(`destination volume ${destination.volumeId} has a parent: an import fills a base volume`, Reason.DESTINATION_CHAIN_MISMATCH);
  }
  if (destination.record.generation !== opts.destinationGeneration) {
    throw failedPrecondition(
      `destination volume ${destination.volumeId} is at generation ${destination.record.generation}, the request expected ${opts.destinationGeneration}`,
      Reason.GENERATION_MISMATCH,
    );
  }
}
