// Confined file access (storage confinement): the typed side of the addon's openBeneath.
// Kept apart from the sanlock binding in index.ts; both load the same native addon.
import path from 'node:path';

interface ConfinedFsBinding {
  openBeneath(root: string, relative: string, flags: number, mode: number): Promise<number>;
  // Confined steps: absent from an addon built before them (then confinedSteps() is undefined).
  createBeneath?(
    root: string,
    relative: string,
    mode: number,
    gid: number,
    data: Buffer | null,
    truncateTo: number,
    sync: boolean,
    keepOpen: boolean,
  ): Promise<{ fd: number; blocks: number }>;
  mkdirBeneath?(root: string, parentRelative: string, name: string, mode: number, gid: number): Promise<void>;
  syncBeneath?(root: string, relative: string, flags: number): Promise<void>;
  renameBeneath?(root: string, fromParent: string, fromName: string, toParent: string, toName: string): Promise<void>;
  lstatBeneath?(root: string, parentRelative: string, name: string): Promise<RawStat | null>;
  syncClose?(fd: number): Promise<void>;
}

/** What lstatBeneath returns: the fields of Node's Stats (times in ms). */
export interface RawStat {
  dev: number;
  ino: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  size: number;
  blksize: number;
  blocks: number;
  atimeMs: number;
  mtimeMs: number;
  ctimeMs: number;
}

/**
 * Confined steps (issue 17: CPU per create): each runs as ONE thread-pool job — the confined open
 * (openBeneath's rules) and the calls on what it opened — instead of a round trip per call. Names
 * are single components acted on through their opened parent (never following a link).
 */
export interface ConfinedSteps {
  /** A new file (exclusive): group (gid ≥ 0) and exact mode, data written at 0, truncated (≥ 0), fsynced, fstat'ed; fd −1 unless keepOpen. */
  createBeneath(
    root: string,
    relative: string,
    opts: { mode: number; gid?: number; data?: Buffer; truncateTo?: number; sync?: boolean; keepOpen?: boolean },
  ): Promise<{ fd: number; blocks: number }>;
  /** mkdirat(name) in the opened parent, then the directory's group (gid ≥ 0) and exact mode. */
  mkdirBeneath(root: string, parentRelative: string, name: string, mode: number, gid?: number): Promise<void>;
  /** Opens relative (flags), fsyncs and closes it. */
  syncBeneath(root: string, relative: string, flags: number): Promise<void>;
  /** renameat(2) between the opened parents. */
  renameBeneath(root: string, fromParent: string, fromName: string, toParent: string, toName: string): Promise<void>;
  /** fstatat(AT_SYMLINK_NOFOLLOW) in the opened parent; name '' stats the parent itself; null: no such name (or parent). */
  lstatBeneath(root: string, parentRelative: string, name: string): Promise<RawStat | null>;
  /** fsync, then close (closed even when the fsync fails). */
  syncClose(fd: number): Promise<void>;
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

let steps: ConfinedSteps | null | undefined;

/** The confined steps of the built addon, or undefined if it was built before them. */
export function confinedSteps(): ConfinedSteps | undefined {
  if (steps === undefined) {
    const b = confinedFsBinding();
    const { createBeneath, mkdirBeneath, syncBeneath, renameBeneath, lstatBeneath, syncClose } = b;
    steps =
      createBeneath && mkdirBeneath && syncBeneath && renameBeneath && lstatBeneath && syncClose
        ? {
            createBeneath: (root, relative, o) =>
              createBeneath.call(b, root, relative, o.mode, o.gid ?? -1, o.data ?? null, o.truncateTo ?? -1, !!o.sync, !!o.keepOpen),
            mkdirBeneath: (root, parent, name, mode, gid) => mkdirBeneath.call(b, root, parent, name, mode, gid ?? -1),
            syncBeneath: (root, relative, flags) => syncBeneath.call(b, root, relative, flags),
            renameBeneath: (root, fromParent, fromName, toParent, toName) => renameBeneath.call(b, root, fromParent, fromName, toParent, toName),
            lstatBeneath: (root, parent, name) => lstatBeneath.call(b, root, parent, name),
            syncClose: (fd) => syncClose.call(b, fd),
          }
        : null;
  }
  return steps ?? undefined;
}
