import type { pb } from '@sdmesh/common';
import type { Flow } from '../engine';
import { activateStorageDomain } from './activate-storage-domain';
import { attachStorageDomain } from './attach-storage-domain';
import { cloneDisk } from './clone-disk';
import { copyDisk, moveDisk } from './copy-disk';
import { createDisk } from './create-disk';
import { createStorageDomain } from './create-storage-domain';
import { deactivateStorageDomain } from './deactivate-storage-domain';
import { deleteDisk } from './delete-disk';
import { deleteSnapshot } from './delete-snapshot';
import { activateHost, startHostMaintenance } from './host-maintenance';
import { amendDisk } from './amend-disk';
import { addDiskBitmap, clearDiskBitmaps, removeDiskBitmap } from './disk-bitmaps';
import { extendDisk } from './extend-disk';
import { importDisk } from './import-disk';
import { startImageTransfer } from './image-transfer';
import { markDiskTemplate } from './mark-disk-template';
import type { AnyOperationKind, RunEnv } from './operation';
import { removeStorageDomain } from './remove-storage-domain';
import { snapshotDisk } from './snapshot-disk';
import { sparsifyDisk } from './sparsify-disk';

export {
  activateHost,
  activateStorageDomain,
  attachStorageDomain,
  cloneDisk,
  copyDisk,
  createDisk,
  createStorageDomain,
  deactivateStorageDomain,
  deleteDisk,
  deleteSnapshot,
  importDisk,
  markDiskTemplate,
  moveDisk,
  removeStorageDomain,
  snapshotDisk,
  startHostMaintenance,
};
export { addDiskBitmap, amendDisk, clearDiskBitmaps, extendDisk, removeDiskBitmap, sparsifyDisk };
export { startImageTransfer };
export type { AnyOperationKind, OperationKind, PrepareEnv, RunEnv } from './operation';

/** Every operation kind the scheduler runs. */
export const OPERATION_KINDS: readonly AnyOperationKind[] = [
  createStorageDomain,
  removeStorageDomain,
  attachStorageDomain,
  deactivateStorageDomain,
  activateStorageDomain,
  startHostMaintenance,
  activateHost,
  createDisk,
  deleteDisk,
  snapshotDisk,
  deleteSnapshot,
  copyDisk,
  moveDisk,
  importDisk,
  markDiskTemplate,
  cloneDisk,
  extendDisk,
  sparsifyDisk,
  amendDisk,
  addDiskBitmap,
  removeDiskBitmap,
  clearDiskBitmaps,
  startImageTransfer,
];

/**
 * The engine's flow table, by operation type: each kind's run and rollback bound to the
 * environment. A flow reads the params its own kind's prepare stored under the same type.
 */
export function flowTable(env: RunEnv): Map<pb.OperationType, Flow> {
  return new Map(
    OPERATION_KINDS.map((kind): [pb.OperationType, Flow] => {
      const { rollback } = kind;
      return [kind.type, { run: (ctx) => kind.run(env, ctx), rollback: rollback && ((ctx, error) => rollback(env, ctx, error)) }];
    }),
  );
}
