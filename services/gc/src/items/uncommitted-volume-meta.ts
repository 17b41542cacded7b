/**
 * `<vol>.meta.tx-<txid>` in a committed image: the marker of an interrupted snapshot create, or
 * the temp copy of an interrupted record update. Never committed, so no lease to take.
 */
import { Skip, fullPath, removeFileDurably, type ItemKind } from './core';

export const uncommittedVolumeMeta: ItemKind = {
  kind: 'uncommitted-volume-meta',
  rank: 1,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    // Gone since the listing: a transaction committed (renamed) it, not us.
    if (!(await ctx.dom.exists(full))) throw new Skip('gone', `${item.relativePath} is gone`);
    return removeFileDurably(ctx, full);
  },
};
