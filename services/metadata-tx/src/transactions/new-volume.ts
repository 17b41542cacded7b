/** What the two ways of creating a volume (a new image, a snapshot) share. */
import {
  checkQcow2Header,
  descriptor,
  FIRST_CHILD_FD,
  ioError,
  runQemuImgWithFds,
  type ConfinedRoot,
  type VolumeFormatName,
  type VolumeRecord,
} from '@sdmesh/common';

/** A volume record before its lease slot is chosen. */
export type PendingRecord = Omit<VolumeRecord, 'leaseSlot'>;

/** The outcome of a create's checks: a record to commit, or the committed volume of an earlier try. */
export type Prepared = { pending: PendingRecord; parentFormat?: VolumeFormatName } | { committed: VolumeRecord };

/** Whether a committed volume is what a (retried) create request asked for. */
export function sameShape(a: PendingRecord, b: PendingRecord): boolean {
  return (
    a.imageId === b.imageId &&
    a.parentId === b.parentId &&
    (a.parentImageId ?? '') === (b.parentImageId ?? '') &&
    a.format === b.format &&
    a.allocation === b.allocation &&
    a.capacityBytes === b.capacityBytes
  );
}

/** The backing name written into an overlay's header: relative, so the chain works wherever the domain is mounted. */
export const backingName = (r: Pick<VolumeRecord, 'parentId' | 'parentImageId'>): string =>
  r.parentImageId ? `../${r.parentImageId}/${r.parentId}` : r.parentId;

/**
 * Creates a volume's data file (new name, mode 0660) and lets qemu-img format it through the
 * opened fd: qemu-img is never given a path. Resolves to the bytes the file allocates. A snapshot names its parent by relative name
 * in the header (-u: qemu-img does not open it) — a thin clone its template's as ../<image>/<volume>,
 * inside the domain — and readers always state the backing themselves.
 */
export async function createVolumeData(
  dom: ConfinedRoot,
  file: string,
  r: VolumeRecord,
  opts: { signal?: AbortSignal; parentFormat?: VolumeFormatName; qemuImgBinary?: string },
): Promise<number> {
  // A sparse raw file: created at its size, fsynced and closed in one confined step.
  if (!r.parentId && r.format === 'RAW' && r.allocation === 'SPARSE') {
    return dom.writeNewFile(file, 'volume', { truncateTo: r.capacityBytes }).catch((err: unknown) => {
      throw ioError(err, `new volume ${r.volumeId}`);
    });
  }
  // The descriptor openat2 created (descriptor ops: no second open through /proc).
  const fd = await dom.createFileDescriptor(file, 'volume');
  try {
    // The new file is the child's fd 3: qemu-img formats what we created, wherever the name points now.
    const newFile = `/dev/fd/${FIRST_CHILD_FD}`;
    const qemu = { files: [fd], signal: opts.signal, command: opts.qemuImgBinary ? { file: opts.qemuImgBinary, args: [] } : undefined };
    if (r.parentId) {
      await runQemuImgWithFds(
        ['create', '-q', '-u', '-f', 'qcow2', '-b', backingName(r), '-F', (opts.parentFormat ?? 'RAW').toLowerCase(), newFile, String(r.capacityBytes)],
        qemu,
      );
    } else {
      const options = r.allocation === 'PREALLOCATED' ? ['-o', 'preallocation=falloc'] : [];
      await runQemuImgWithFds(['create', '-q', '-f', r.format.toLowerCase(), ...options, newFile, String(r.capacityBytes)], qemu);
    }
    if (r.format === 'QCOW2')
      await checkQcow2Header({ read: (buf, offset, length, position) => descriptor.read(fd, buf, offset, length, position) }, `new volume ${r.volumeId}`);
    await descriptor.sync(fd);
    return (await descriptor.stat(fd)).blocks * 512;
  } catch (err) {
    throw ioError(err, `new volume ${r.volumeId}`);
  } finally {
    await descriptor.close(fd);
  }
}
