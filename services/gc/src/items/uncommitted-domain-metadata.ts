/** `dom_md/metadata.tx-*`: the temp file of an interrupted FormatDomain commit. */
import { Skip, fullPath, removeFileDurably, type ItemKind } from './core';

export const uncommittedDomainMetadata: ItemKind = {
  kind: 'uncommitted-domain-metadata',
  rank: 0,
  async underDomainLease(ctx, item) {
    const full = fullPath(ctx, item);
    // Gone since the listing: a transaction committed (renamed) it, or removed it (an expired fence).
    if (!(await ctx.dom.exists(full))) throw new Skip('gone', `${item.relativePath} is gone`);
    return removeFileDurably(ctx, full);
  },
};
