/**
 * `_deleted_<vol>_<ms>.meta` in a committed image: a deleted volume's record, which still
 * claims its lease slot. Under the volume's lease: any data of that volume left beside it,
 * then the record.
 */
import path from 'node:path';
import { classifyVolumeEntry, volumeMetaName } from '@sdmesh/common';
import { fullPath, readRecordOrSkip, removeFile, removeFileDurably, underVolumeLease, type ItemKind } from './core';

export const deletedVolumeMeta: ItemKind = {
  kind: 'deleted-volume-meta',
  rank: 2,
  async underDomainLease(ctx, item) {
    const file = fullPath(ctx, item);
    const dir = path.dirname(file);
    const record = await readRecordOrSkip(ctx.domain, file);
    return underVolumeLease(ctx, record, async () => {
      let bytes = 0;
      const hasCommittedMeta = await ctx.dom.exists(path.join(dir, volumeMetaName(item.volumeId!)));
      // The image's names, listed once for every deleted volume of the batch in it (not once per volume).
      for (const name of await ctx.listOnce(dir)) {
        const e = classifyVolumeEntry(name);
        const dataOfThisVolume =
          (e.kind === 'deleted-data' && e.volumeId === item.volumeId) || (e.kind === 'data' && e.volumeId === item.volumeId && !hasCommittedMeta);
        if (!dataOfThisVolume) continue;
        const b = await removeFile(ctx.dom, path.join(dir, name));
        // If that file was an item of this pass too, it is done now (and reported as itself).
        if (!ctx.removedAlongside(path.relative(ctx.domain.path, path.join(dir, name)), b)) bytes += b;
      }
      // Made durable with the batch, like the record's removal: whichever a crash brings back is
      // still garbage by name (a deleted volume's data, an orphan data file, a deleted record).
      ctx.syncDir(dir);
      ctx.faults.hit('gc.item.after-data');
      bytes += await removeFileDurably(ctx, file);
      ctx.faults.hit('gc.item.after-record');
      return bytes;
    });
  },
};
