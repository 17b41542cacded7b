/** A data file with no record in a committed image: the data of an interrupted snapshot create. */
import path from 'node:path';
import { volumeMetaName } from '@sdmesh/common';
import { Skip, fullPath, removeFileDurably, type ItemKind } from './core';

export const orphanVolumeData: ItemKind = {
  kind: 'orphan-volume-data',
  rank: 0,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    // Listed before we held the lease: a snapshot in flight then may have committed since.
    if (await ctx.dom.exists(path.join(path.dirname(full), volumeMetaName(item.volumeId!)))) {
      throw new Skip('gone', `${item.relativePath} has a committed record now`);
    }
    return removeFileDurably(ctx, full);
  },
};
