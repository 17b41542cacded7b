import { failedPrecondition, pb, Reason } from '@sdmesh/common';
import { bounded, type CallBound, type Cluster } from '../cluster';
import type { DomainEntry } from '../domains';
import { CALL_TIMEOUT_MS } from '../policies';

/**
 * What the operations know of templates and thin clones (docs/templates.md). The disk's
 * volumes say it: a template's one volume has `template` set; a thin clone's base names its
 * template's image in `parent_image_id`. metadata-tx and the data-mover enforce the same
 * rules on storage; these checks refuse early, before anything is stored.
 */

export const isTemplate = (vols: readonly pb.Volume[]): boolean => vols.some((v) => v.template);
/** The template disk a thin clone's base is an overlay on ('' for any other disk). */
export const templateOf = (vols: readonly pb.Volume[]): string => vols.find((v) => v.parentImageId)?.parentImageId ?? '';

/** A template is read-only: `what` (snapshot, move ...) is refused. */
export function refuseTemplate(diskId: string, vols: readonly pb.Volume[], what: string): void {
  if (isTemplate(vols)) throw failedPrecondition(`disk ${diskId} is a template (read-only): it can't ${what}; clone it instead`, Reason.DISK_IS_TEMPLATE);
}

/** Disks of the domain that are thin clones of `templateDiskId`. */
export async function countClones(cluster: Cluster, entry: DomainEntry, templateDiskId: string, bound?: CallBound): Promise<number> {
  const { images } = await cluster.read([], (h) => h.clients.metadata.listImages({ domainPath: entry.path }, bounded(bound, CALL_TIMEOUT_MS.listDisks)));
  return images.filter((i) => templateOf(i.volumes) === templateDiskId).length;
}

/** A template can't be deleted while clones use it (metadata-tx checks again under the domain lease). */
export async function refuseDeletingUsedTemplate(
  cluster: Cluster,
  entry: DomainEntry,
  diskId: string,
  vols: readonly pb.Volume[],
  bound?: CallBound,
): Promise<void> {
  if (!isTemplate(vols)) return;
  const clones = await countClones(cluster, entry, diskId, bound);
  if (clones > 0) throw failedPrecondition(`template disk ${diskId} still backs ${clones} thin clone(s): delete them first`, Reason.TEMPLATE_HAS_CLONES);
}
