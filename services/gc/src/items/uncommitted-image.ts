/** `images/_tx_<txid>_<img>`: the directory of an interrupted new-image create. */
import path from 'node:path';
import { fullPath, readDirOrGone, removeDataFiles, removeDir, removeFile, type ItemKind } from './core';

export const uncommittedImage: ItemKind = {
  kind: 'uncommitted-image',
  rank: 1,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    // Never committed, so no one ever took a lease on its volume: no volume lease needed.
    let bytes = await removeDataFiles(ctx, full);
    ctx.faults.hit('gc.item.after-data');
    for (const name of await readDirOrGone(ctx.dom, full)) bytes += await removeFile(ctx.dom, path.join(full, name));
    ctx.faults.hit('gc.item.after-record');
    await removeDir(ctx, full);
    return bytes;
  },
};
