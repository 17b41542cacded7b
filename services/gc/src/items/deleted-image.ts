/**
 * `images/_deleted_<img>_<ms>`: a deleted image. Its data goes without the domain lease; its
 * records (the slot claims) under it, each committed one under its volume's lease, and last
 * the directory.
 */
import path from 'node:path';
import { classifyVolumeEntry } from '@sdmesh/common';
import { fullPath, readDirOrGone, removeDataFiles, removeDir, removeFile, removeRecordUnderVolumeLease, type ItemKind } from './core';

export const deletedImage: ItemKind = {
  kind: 'deleted-image',
  withoutDomainLease: { final: false, remove: (ctx, item) => removeDataFiles(ctx, fullPath(ctx, item)) },
  rank: 3,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    let bytes = await removeDataFiles(ctx, full);
    ctx.faults.hit('gc.item.after-data');
    const names = await readDirOrGone(ctx.dom, full);
    // Uncommitted records (.meta.tx-*) first: no one ever held their lease; an update's
    // temp copy names the same slot as the committed record, which still claims it.
    for (const name of names.filter((n) => classifyVolumeEntry(n).kind === 'meta-tx')) bytes += await removeFile(ctx.dom, path.join(full, name));
    for (const name of names.filter((n) => classifyVolumeEntry(n).kind !== 'meta-tx')) {
      bytes += await removeRecordUnderVolumeLease(ctx, path.join(full, name));
    }
    ctx.faults.hit('gc.item.after-record');
    await removeDir(ctx, full);
    return bytes;
  },
};
