/**
 * `dom_md/fence_<operationId>_<ms>` older than the fence retention: an operation fence no create of
 * its operation can still need (docs/storage-format.md, "Operation fences"). Removed under the domain
 * metadata lease, as metadata-tx's FenceOperation removes them: the creates' fence checks and
 * FenceOperation read dom_md only under that lease, so none of them sees it half-removed. The step
 * is the one of a dom_md temp file: a regular file only, gone = someone else removed it.
 */
import type { ItemKind } from './core';
import { uncommittedDomainMetadata } from './uncommitted-domain-metadata';

export const expiredFence: ItemKind = {
  kind: 'expired-fence',
  rank: 0,
  underDomainLease: uncommittedDomainMetadata.underDomainLease,
};
