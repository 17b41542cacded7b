/**
 * qcow2 persistent dirty bitmaps (incremental backup), through `qemu-img bitmap` and `qemu-img info`.
 *
 * Holds:
 * - validateBitmapName: the names sdmesh accepts (they become qemu-img arguments);
 * - parseBitmaps / isValidBitmap: the bitmaps of `qemu-img info --output=json` (format-specific data);
 * - QemuBitmaps: list, add, remove, clear and merge on one opened qcow2 file, plus the chain rules
 *   oVirt's vdsm follows (lib/vdsm/storage/bitmaps.py): `carryTo` (a new leaf gets its parent's
 *   valid bitmaps, so later writes are tracked there), `mergeInto` (after a commit of top into base:
 *   top's valid bitmaps are added to base where missing and merged), `pruneStale`.
 *
 * A bitmap lives in one qcow2 file (not in the chain): every call names one top file and no backing
 * (`backing: null` in the spec), given to qemu-img as an opened fd (see qemu-img.ts), so no path of a
 * domain is ever resolved by qemu-img. Callers hold the volume's lease (exclusive to change, any
 * to read) and bump its generation after a change; this module only runs qemu-img.
 */
import type { FileHandle } from 'node:fs/promises';
import { failedPrecondition, invalidArgument } from '../errors';
import { Reason } from '../reasons';
import { FIRST_CHILD_FD, imageSpec, runQemuImgWithFds, type RunQemuImgOptions } from './qemu-img';

/** One persistent dirty bitmap of a qcow2 file. */
export interface DirtyBitmap {
  name: string;
  /** Bytes per bit. */
  granularity: number;
  /** qemu's flags: `auto` (enabled: tracks every write), `in-use` (not stored cleanly: inconsistent). */
  flags: string[];
}

/** Longest bitmap name accepted (qcow2 allows 1023 bytes; names are UUIDs or short labels in practice). */
export const BITMAP_NAME_MAX = 128;
const BITMAP_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]*$/;

/**
 * A bitmap name from a request: 1..128 characters of [A-Za-z0-9._:-], starting with a letter or digit
 * (so never an option to qemu-img, never a path, never a control or space character).
 * INVALID_ARGUMENT INVALID_BITMAP_NAME otherwise.
 */
export function validateBitmapName(name: unknown, field = 'bitmap'): string {
  if (typeof name !== 'string' || name.length === 0) throw invalidArgument(`${field} name is required`, Reason.INVALID_BITMAP_NAME);
  if (name.length > BITMAP_NAME_MAX)
    throw invalidArgument(`${field} name is ${name.length} characters long; at most ${BITMAP_NAME_MAX} are allowed`, Reason.INVALID_BITMAP_NAME);
  if (!BITMAP_NAME_RE.test(name)) {
    throw invalidArgument(
      `${field} name ${JSON.stringify(name.slice(0, 64))} may hold only letters, digits and . _ : - and must start with a letter or digit`,
      Reason.INVALID_BITMAP_NAME,
    );
  }
  return name;
}

/** Bitmap granularities qemu accepts: a power of two from 512 B to 2 GiB (0 = qemu's default, the cluster size). */
export function validateGranularity(bytes: number): number {
  if (bytes === 0) return 0;
  if (!Number.isSafeInteger(bytes) || bytes < 512 || bytes > 2 ** 31 || (bytes & (bytes - 1)) !== 0) {
    throw invalidArgument(`bitmap granularity ${bytes} must be a power of two from 512 bytes to 2 GiB (or 0 for the default)`, Reason.INVALID_ARGUMENT);
  }
  return bytes;
}

/**
 * Valid for backup (vdsm's `_valid`): enabled (`auto`: it tracked every write) and not `in-use`
 * (a writer that did not close the image cleanly may have written without recording it).
 */
export const isValidBitmap = (b: DirtyBitmap) => b.flags.includes('auto') && !b.flags.includes('in-use');

/** The bitmaps in `qemu-img info --output=json` output (a raw image or one without bitmaps: none). */
export function parseBitmaps(info: string | object): DirtyBitmap[] {
  const parsed = (typeof info === 'string' ? JSON.parse(info) : info) as {
    'format-specific'?: { type?: string; data?: { bitmaps?: Array<{ name?: unknown; granularity?: unknown; flags?: unknown }> } };
  };
  const list = parsed['format-specific']?.data?.bitmaps ?? [];
  return list.map((b) => ({
    name: String(b.name ?? ''),
    granularity: Number(b.granularity ?? 0),
    flags: Array.isArray(b.flags) ? b.flags.map(String) : [],
  }));
}

/** The qcow2 compat level ("0.10", "1.1") in `qemu-img info --output=json` output ('' for raw). */
export function parseQcow2Compat(info: string | object): string {
  const parsed = (typeof info === 'string' ? JSON.parse(info) : info) as { 'format-specific'?: { data?: { compat?: unknown } } };
  return String(parsed['format-specific']?.data?.compat ?? '');
}

/** One qcow2 file: its own layer only (bitmaps are per file), opened by the caller (for writing to change it). */
const topSpec = (fd: number) => imageSpec([{ fd, format: 'QCOW2' }]);
/** The same, written: opened O_DIRECT by qemu-img (no bitmap write is left in the page cache when it exits). */
const writtenSpec = (fd: number) => imageSpec([{ fd, format: 'QCOW2', direct: true }]);

/** How qemu-img is run: the program (e.g. `setpriv --pdeathsig KILL qemu-img`), an abort signal, fds it inherits. */
export type BitmapRunOptions = Pick<RunQemuImgOptions, 'command' | 'signal' | 'inheritFds'>;

/**
 * Bitmap commands on opened qcow2 files. Every method takes the file(s) it works on; none takes a lease
 * or writes a record (see the header).
 */
export class QemuBitmaps {
  constructor(private readonly opts: BitmapRunOptions = {}) {}

  private run(args: string[], files: FileHandle[]): Promise<{ stdout: string }> {
    return runQemuImgWithFds(args, { ...this.opts, files });
  }

  /** `qemu-img info` of the file (force-share: works while someone has it open). */
  async info(file: FileHandle): Promise<string> {
    return (await this.run(['info', '-U', '--output=json', '-f', 'qcow2', topSpec(FIRST_CHILD_FD)], [file])).stdout;
  }

  async list(file: FileHandle): Promise<DirtyBitmap[]> {
    return parseBitmaps(await this.info(file));
  }

  /**
   * Adds a bitmap (enabled unless `enabled: false`; granularity 0 = qemu's default). A qcow2 v2
   * (compat 0.10) file can't store bitmaps: FAILED_PRECONDITION QCOW2_COMPAT_TOO_OLD.
   */
  async add(file: FileHandle, name: string, opts: { granularity?: number; enabled?: boolean; compat?: string } = {}): Promise<void> {
    validateBitmapName(name);
    const compat = opts.compat ?? parseQcow2Compat(await this.info(file));
    if (compat === '0.10') {
      throw failedPrecondition(`a qcow2 compat 0.10 volume can't store dirty bitmaps: amend it to compat 1.1 first`, Reason.QCOW2_COMPAT_TOO_OLD);
    }
    const args = ['bitmap', '--add'];
    if (opts.granularity) args.push('-g', String(validateGranularity(opts.granularity)));
    if (opts.enabled === false) args.push('--disable');
    await this.run([...args, '-f', 'qcow2', writtenSpec(FIRST_CHILD_FD), name], [file]);
  }

  /** Removes a bitmap; one that is not there counts as removed (false), as in vdsm. */
  async remove(file: FileHandle, name: string): Promise<boolean> {
    validateBitmapName(name);
    if (!(await this.list(file)).some((b) => b.name === name)) return false;
    await this.run(['bitmap', '--remove', '-f', 'qcow2', writtenSpec(FIRST_CHILD_FD), name], [file]);
    return true;
  }

  /** Removes every bitmap of the file; returns their names. */
  async clear(file: FileHandle): Promise<string[]> {
    const names = (await this.list(file)).map((b) => b.name);
    for (const name of names) await this.run(['bitmap', '--remove', '-f', 'qcow2', writtenSpec(FIRST_CHILD_FD), name], [file]);
    return names;
  }

  /**
   * `qemu-img bitmap --merge`: ORs bitmap `sourceName` of `source` (read) into bitmap `targetName` of
   * `target` (written; it must exist).
   */
  async merge(source: FileHandle, sourceName: string, target: FileHandle, targetName: string): Promise<void> {
    validateBitmapName(sourceName, 'source bitmap');
    validateBitmapName(targetName, 'target bitmap');
    // The target is fd 3, the source fd 4.
    await this.run(
      ['bitmap', '--merge', sourceName, '-b', topSpec(FIRST_CHILD_FD + 1), '-F', 'qcow2', '-f', 'qcow2', writtenSpec(FIRST_CHILD_FD), targetName],
      [target, source],
    );
  }

  /**
   * A new leaf on top of `parent` gets the parent's valid bitmaps (same names and granularities,
   * enabled), so the writes that now go to the leaf are tracked there (vdsm `add_bitmaps`, called
   * when a snapshot volume is created). Invalid ones (disabled, in-use) are not carried. Returns the
   * names added.
   */
  async carryTo(parent: FileHandle, child: FileHandle): Promise<string[]> {
    const wanted = (await this.list(parent)).filter(isValidBitmap);
    if (wanted.length === 0) return [];
    const present = new Set((await this.list(child)).map((b) => b.name));
    const compat = parseQcow2Compat(await this.info(child));
    const added: string[] = [];
    for (const b of wanted) {
      if (present.has(b.name)) continue;
      await this.add(child, b.name, { granularity: b.granularity, compat });
      added.push(b.name);
    }
    return added;
  }

  /**
   * After `top`'s data was committed into `base` (a merge), keeps the bitmaps tracking (vdsm
   * `merge_bitmaps`): every valid bitmap of top is added to base where missing (unless base's parent
   * has it and base does not: a hole in the bitmap chain, such a bitmap is not trustworthy and is
   * skipped), then merged from top into base. Returns the names merged.
   */
  async mergeInto(top: FileHandle, base: FileHandle, baseParent?: FileHandle): Promise<string[]> {
    const topBitmaps = (await this.list(top)).filter(isValidBitmap);
    const baseNames = new Set((await this.list(base)).map((b) => b.name));
    const parentNames = new Set(baseParent ? (await this.list(baseParent)).map((b) => b.name) : []);
    const merged: string[] = [];
    for (const b of topBitmaps) {
      if (!baseNames.has(b.name)) {
        if (parentNames.has(b.name)) continue;
        await this.add(base, b.name, { granularity: b.granularity });
      }
      await this.merge(top, b.name, base, b.name);
      merged.push(b.name);
    }
    return merged;
  }

  /** Removes from `base` the bitmaps that `top` no longer has valid (vdsm `prune_bitmaps`); returns their names. */
  async pruneStale(base: FileHandle, top: FileHandle): Promise<string[]> {
    const valid = new Set((await this.list(top)).filter(isValidBitmap).map((b) => b.name));
    const stale = (await this.list(base)).map((b) => b.name).filter((n) => !valid.has(n));
    for (const name of stale) await this.remove(base, name);
    return stale;
  }
}
