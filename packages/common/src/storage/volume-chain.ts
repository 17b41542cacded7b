import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { failedPrecondition, GrpcStatus, invalidArgument, notFound } from '../errors';
import type * as pb from '../proto';
import { Reason } from '../reasons';
import { ConfinedRoot, reopenDirect } from './confined';
import { listVolumeRecords, readDomainMetadata, readVolumeRecord } from './domain';
import { ioError } from './fsio';
import { DomainLayout, volumeDataName, volumeMetaName } from './layout';
import { checkQcow2Header, imageSpec } from './qemu-img';
import { parentImageOf, type VolumeRecord } from './records';
import { safeJoin, validateDomainPath, validateId } from './validation';

// Reading a volume and its chain from a domain (records only, never image headers) and opening
// it for qemu: shared by the data-mover and the CSI node.

/** A volume as read from its domain: where its record and data are, and its chain. */
export interface ResolvedVolume {
  domain: { id: string; path: string };
  imageId: string;
  volumeId: string;
  record: VolumeRecord;
  metaPath: string;
  dataPath: string;
  imageDir: string;
  /** The volume's ancestors, parent first (empty for a base volume); a thin clone's last one is its template's volume, in the template's image. */
  ancestors: VolumeRecord[];
  /** Ids of volumes whose parent is this one. */
  children: string[];
}

/** Validates a VolumeRef's ids and path (INVALID_ARGUMENT) without touching storage. */
export function checkRef(what: string, ref: pb.VolumeRef | undefined): { domainPath: string; imageId: string; volumeId: string } {
  if (!ref) throw invalidArgument(`${what} is missing`, Reason.INVALID_ARGUMENT);
  return {
    domainPath: validateDomainPath(ref.domainPath),
    imageId: validateId(`${what} image id`, ref.imageId),
    volumeId: validateId(`${what} volume id`, ref.volumeId),
  };
}

/** Reads a volume's domain, record and chain. NOT_FOUND for a missing domain, image or volume. */
export async function resolveVolume(what: string, ref: pb.VolumeRef | undefined): Promise<ResolvedVolume> {
  const { domainPath, imageId, volumeId } = checkRef(what, ref);
  const md = await readDomainMetadata(domainPath).catch((err: unknown) => {
    const e = ioError(err, `${what} domain ${domainPath}`);
    throw e.code === GrpcStatus.NOT_FOUND ? notFound(`${what} domain ${domainPath} does not exist (no dom_md/metadata)`, Reason.DOMAIN_NOT_FOUND) : e;
  });
  const layout = new DomainLayout(domainPath);
  const imageDir = safeJoin(layout.imagesDir, imageId);
  const metaPath = safeJoin(imageDir, volumeMetaName(volumeId));
  const expect = { imageId, domainId: md.domainId };
  // The record and its image's listing at once (one wait for storage less per volume resolved: every
  // copy job resolves its volumes three times); the record's error counts first.
  const [read, listed] = await Promise.allSettled([readVolumeRecord(metaPath, { volumeId, ...expect }), listVolumeRecords(imageDir, expect)]);
  if (read.status === 'rejected') {
    const e = ioError(read.reason, metaPath);
    throw e.code === GrpcStatus.NOT_FOUND
      ? notFound(`${what} volume ${volumeId} is not in image ${imageId} of domain ${md.domainId}`, Reason.VOLUME_NOT_FOUND)
      : e;
  }
  if (listed.status === 'rejected') throw listed.reason;
  const record = read.value;
  const listing = listed.value;
  const ancestors = await readAncestors(what, record, listing.records, layout, md.domainId);
  return {
    domain: { id: md.domainId, path: domainPath },
    imageId,
    volumeId,
    record,
    metaPath,
    dataPath: path.join(imageDir, volumeDataName(volumeId)),
    imageDir,
    ancestors,
    children: listing.records.filter((r) => r.parentId === volumeId).map((r) => r.volumeId),
  };
}

/**
 * A volume's ancestors, parent first. A record naming a parent in another image (a thin
 * clone's base) continues in that image of the same domain, where the parent must be a
 * template's base volume: the chain is built from records alone, never from an image header.
 */
async function readAncestors(what: string, record: VolumeRecord, ownImage: VolumeRecord[], layout: DomainLayout, domainId: string): Promise<VolumeRecord[]> {
  const ancestors: VolumeRecord[] = [];
  let image = { id: record.imageId, records: ownImage };
  for (let child = record; child.parentId;) {
    const parentImageId = parentImageOf(child);
    if (parentImageId !== image.id) {
      const listing = await listVolumeRecords(safeJoin(layout.imagesDir, parentImageId), { imageId: parentImageId, domainId });
      image = { id: parentImageId, records: listing.records };
    }
    const parent = image.records.find((r) => r.volumeId === child.parentId);
    if (!parent) {
      throw failedPrecondition(
        `${what} volume ${record.volumeId}: its ancestor ${child.parentId} has no readable record in image ${parentImageId}`,
        Reason.BROKEN_CHAIN,
      );
    }
    if (parentImageId !== child.imageId && !(parent.template && parent.parentId === '')) {
      throw failedPrecondition(
        `${what} volume ${record.volumeId}: its ancestor ${parent.volumeId} in image ${parentImageId} is not a template`,
        Reason.BROKEN_CHAIN,
      );
    }
    if (ancestors.includes(parent) || parent === record)
      throw failedPrecondition(`${what} volume ${record.volumeId}: its chain loops at ${parent.volumeId}`, Reason.BROKEN_CHAIN);
    ancestors.push(parent);
    child = parent;
  }
  return ancestors;
}

/** A volume's chain opened for qemu-img: top first, each a confined, type-checked fd. */
export interface OpenedChain {
  handles: FileHandle[];
  formats: Array<'RAW' | 'QCOW2'>;
  /** The json: spec naming the handles as the child's fds firstFd, firstFd + 1 ... */
  spec(firstFd: number): string;
  close(): Promise<void>;
}

/**
 * Opens a volume's data file (for writing when `write`: then O_DIRECT, and the spec says so; read
 * it through another, buffered open) and its ancestors' (read-only; with `readDirect` the spec
 * says cache.direct for every layer, so qemu reads them past the page cache)
 * through the domain's ConfinedRoot: a symlink, FIFO, device, directory or hard-linked file
 * at any of them is refused, and a qcow2 layer with an external data file or encryption too.
 */
export async function openVolumeChain(
  v: ResolvedVolume,
  /** unlockedAncestors: no qemu image lock on the ancestors (see ImageLayer.unlocked): a keep-chain copy's destination only. */
  opts: { write?: boolean; topOnly?: boolean; readDirect?: boolean; unlockedAncestors?: boolean } = {},
): Promise<OpenedChain> {
  const dom = new ConfinedRoot(v.domain.path);
  const records = opts.topOnly ? [v.record] : [v.record, ...v.ancestors];
  const handles: FileHandle[] = [];
  const close = async () => {
    await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
  };
  try {
    for (const [i, r] of records.entries()) {
      // A thin clone's template volume lies in the template's image (a sibling directory).
      const file = path.join(path.dirname(v.imageDir), r.imageId, volumeDataName(r.volumeId));
      const write = !!opts.write && i === 0;
      const handle = await dom.openFile(file, { kind: 'volume', write, notFoundReason: Reason.VOLUME_DATA_MISSING });
      handles.push(handle);
      if (r.format === 'QCOW2') await checkQcow2Header(handle, `volume ${r.volumeId}`);
      if (write) {
        // The writer gets only an O_DIRECT descriptor of the file it writes (and opens it O_DIRECT
        // itself: the spec's cache.direct), so no write of it waits in the page cache.
        handles[0] = await reopenDirect(handle, `volume ${r.volumeId}`);
        await handle.close();
      }
    }
  } catch (err) {
    await close();
    throw err;
  }
  const formats = records.map((r) => r.format);
  return {
    handles,
    formats,
    spec: (firstFd) =>
      imageSpec(
        formats.map((format, i) => ({
          fd: firstFd + i,
          format,
          direct: !!opts.readDirect || (!!opts.write && i === 0),
          unlocked: !!opts.unlockedAncestors && i > 0,
        })),
      ),
    close,
  };
}
