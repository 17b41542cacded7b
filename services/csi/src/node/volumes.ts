import fs from 'node:fs';
import path from 'node:path';
import {
  DomainLayout,
  failedPrecondition,
  listVolumeRecords,
  notFound,
  parseStorageRoots,
  readDomainMetadata,
  resolveVolume,
  safeJoin,
  type ResolvedVolume,
  Reason,
} from '@sdmesh/common';
import { parseId } from '../controller/names';

/**
 * A CSI volume id as the controller makes it (parseId): `<domain id>/<image id>` — a disk of a
 * domain. Anything else names no volume of ours: NOT_FOUND (the spec's answer for an unknown volume).
 */
export function parseVolumeId(volumeId: string): { domainId: string; imageId: string } {
  const ref = parseId(volumeId);
  if (!ref) throw notFound(`volume "${volumeId.slice(0, 160)}" does not exist: sdmesh volume ids are <domain id>/<disk id>`, Reason.DISK_NOT_FOUND);
  return { domainId: ref.domainId, imageId: ref.diskId };
}

/**
 * The storage domains this host reaches: every `dom_md/metadata` one or two directories below a
 * storage root (SDMESH_STORAGE_ROOTS, as for the other per-host services). Links are not followed.
 */
export async function reachableDomains(rootsEnv = process.env.SDMESH_STORAGE_ROOTS ?? ''): Promise<Array<{ id: string; path: string }>> {
  const roots = rootsEnv ? parseStorageRoots(rootsEnv) : [];
  const found: Array<{ id: string; path: string }> = [];
  const visit = async (dir: string, depth: number): Promise<void> => {
    let entries: fs.Dirent[];
    try {
      entries = await fs.promises.readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (!e.isDirectory()) continue;
      const candidate = path.join(dir, e.name);
      const md = await readDomainMetadata(candidate).catch(() => undefined);
      if (md) found.push({ id: md.domainId, path: candidate });
      else if (depth < 2) await visit(candidate, depth + 1);
    }
  };
  for (const root of roots) await visit(root, 1);
  return found;
}

/**
 * The disk's leaf volume (the one no other volume of the image has as parent) with its chain.
 * NOT_FOUND when this host reaches no such domain, or the domain has no such disk.
 */
export async function resolveDiskLeaf(domain: { id: string; path: string }, imageId: string): Promise<ResolvedVolume> {
  const imageDir = safeJoin(new DomainLayout(domain.path).imagesDir, imageId);
  const { records } = await listVolumeRecords(imageDir, { imageId, domainId: domain.id });
  const leaves = records.filter((r) => !records.some((c) => c.parentId === r.volumeId));
  if (leaves.length === 0) throw notFound(`disk ${imageId} does not exist in storage domain ${domain.id}`, Reason.DISK_NOT_FOUND);
  if (leaves.length > 1) {
    throw failedPrecondition(`disk ${imageId} of domain ${domain.id} has ${leaves.length} leaf volumes: its chain is broken`, Reason.BROKEN_CHAIN);
  }
  return resolveVolume('volume', { domainPath: domain.path, imageId, volumeId: leaves[0]!.volumeId });
}
