/** Every kind of garbage the GC removes, one module each (docs/gc.md), over items/core.ts. */
import type { GarbageKind } from '@sdmesh/common';
import type { ItemKind } from './core';
import { deletedImage } from './deleted-image';
import { deletedVolumeData } from './deleted-volume-data';
import { deletedVolumeMeta } from './deleted-volume-meta';
import { expiredFence } from './expired-fence';
import { orphanVolumeData } from './orphan-volume-data';
import { uncommittedDomainMetadata } from './uncommitted-domain-metadata';
import { uncommittedImage } from './uncommitted-image';
import { uncommittedVolumeMeta } from './uncommitted-volume-meta';

export const ITEM_KINDS: Record<GarbageKind, ItemKind> = {
  'uncommitted-domain-metadata': uncommittedDomainMetadata,
  'uncommitted-volume-meta': uncommittedVolumeMeta,
  'uncommitted-image': uncommittedImage,
  'orphan-volume-data': orphanVolumeData,
  'deleted-volume-data': deletedVolumeData,
  'deleted-volume-meta': deletedVolumeMeta,
  'deleted-image': deletedImage,
  'expired-fence': expiredFence,
};

export { Skip, type GcLeaseProvider, type ItemContext, type SkipReason } from './core';
