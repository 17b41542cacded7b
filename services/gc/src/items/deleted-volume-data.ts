/**
 * `_deleted_<vol>_<ms>` in a committed image: the data file of a deleted volume. Nothing refers
 * to it and no transaction renames it back, so it goes without the domain lease.
 */
import { Skip, fullPath, removeFileDurably, type ItemKind } from './core';

export const deletedVolumeData: ItemKind = {
  kind: 'deleted-volume-data',
  withoutDomainLease: { final: true, remove: (ctx, item) => removeFileDurably(ctx, fullPath(ctx, item)) },
  rank: 0,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    if (!(await ctx.dom.exists(full))) throw new Skip('gone', `${item.relativePath} is gone`);
    return removeFileDurably(ctx, full);
  },
};
