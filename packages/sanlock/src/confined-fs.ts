// Confined file access (storage confinement): the typed side of the addon's openBeneath.
// Kept apart from the sanlock binding in index.ts; both load the same native addon.
import path from 'node:path';

interface ConfinedFsBinding {
  openBeneath(root: string, relative: string, flags: number, mode: number): Promise<number>;
}

const CONFINED_ADDON_PATH = path.join(path.resolve(__dirname, '..'), 'build', 'Release', 'sanlock_addon.node');
let binding: ConfinedFsBinding | undefined;

function confinedFsBinding(): ConfinedFsBinding {
  binding ??= require(CONFINED_ADDON_PATH) as ConfinedFsBinding;
  if (typeof binding.openBeneath !== 'function') {
    throw new Error(`${CONFINED_ADDON_PATH} has no openBeneath: rebuild the addon (npm run build:native -w @sdmesh/sanlock)`);
  }
  return binding;
}

/**
 * Opens `relative` beneath the directory `root` with openat2(2): `root` itself may contain no
 * symbolic link in any component; `relative` may not leave `root` (no "..", no absolute path),
 * may not pass through any symbolic link (or /proc magic link) and may not cross into another
 * mounted file system. Rejects with an Error carrying Node's usual `code` (ELOOP for a link,
 * EXDEV for a mount or an escape, ENOENT ...). The caller owns (and must close) the fd.
 */
export function openBeneath(root: string, relative: string, flags: number, mode = 0): Promise<number> {
  return confinedFsBinding().openBeneath(root, relative, flags, mode);
}
