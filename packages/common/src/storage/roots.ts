import path from 'node:path';
import { invalidArgument, permissionDenied, type SdmeshError } from '../errors';
import { fail, Reason } from '../reasons';
import { ConfinedRoot, type EntryType } from './confined';
import { validateDomainPath } from './validation';

/**
 * Storage roots: the directories of shared storage a service may keep storage domains in
 * (`--storage-roots`, `SDMESH_STORAGE_ROOTS`, comma-separated absolute paths).
 *
 * Secure by default: with no roots configured, no domain may be created, and the per-host
 * services act on no domain. A domain lies strictly beneath a root (never the root itself),
 * never inside another domain, and never above one.
 */

export const STORAGE_ROOTS_FLAG = '--storage-roots';
export const STORAGE_ROOTS_ENV = 'SDMESH_STORAGE_ROOTS';

/** The option every service that touches domains declares (its own option, not a common one). */
export const storageRootsOption = {
  type: 'string',
  env: STORAGE_ROOTS_ENV,
  default: '',
  description:
    'Comma-separated absolute directories of shared storage that storage domains may live in (a domain lies beneath one, never inside or above another domain). Empty: no domain may be used (secure default).',
} as const;

/** Never storage roots (nor anything beneath them). */
const FORBIDDEN_TREES = ['/proc', '/sys', '/dev'];

const within = (dir: string, p: string) => p === dir || p.startsWith(dir + '/');

/** Parses and checks a roots list (syntax only: absolute, normalized, not / or a kernel tree). */
export function parseStorageRoots(list: string): string[] {
  const out: string[] = [];
  for (const raw of list
    .split(',')
    .map((d) => d.trim())
    .filter(Boolean)) {
    if (!path.isAbsolute(raw)) throw new Error(`storage root ${JSON.stringify(raw)} is not an absolute path`);
    if (raw.includes('\0') || raw.split('/').includes('..')) throw new Error(`storage root ${JSON.stringify(raw)} contains ".." or a NUL byte`);
    const root = path.resolve(raw);
    if (root === '/') throw new Error("storage root / is refused: it holds the host's own files");
    for (const t of FORBIDDEN_TREES) if (within(t, root)) throw new Error(`storage root ${raw} is inside ${t}: refused`);
    if (!out.includes(root)) out.push(root);
  }
  return out;
}

/** Most directories a nesting scan lists before it gives up (and refuses). */
export const NESTING_SCAN_MAX_ENTRIES = 10_000;
/** How deep below a new domain's path the scan looks for a domain. */
export const NESTING_SCAN_MAX_DEPTH = 4;

export interface KnownDomain {
  id: string;
  path: string;
}

export class StorageRoots {
  readonly roots: readonly string[];

  /** `service` names who refuses, in messages (e.g. "metadata-tx on host1"). */
  constructor(
    roots: readonly string[] | string,
    readonly service = 'this service',
  ) {
    this.roots = typeof roots === 'string' ? parseStorageRoots(roots) : roots.map((r) => path.resolve(r));
  }

  get configured(): boolean {
    return this.roots.length > 0;
  }

  /** The root a path lies strictly beneath (the longest if roots nest), or undefined. */
  rootOf(p: string): string | undefined {
    const abs = path.resolve(p);
    return this.roots.filter((r) => abs.startsWith(r + '/')).sort((a, b) => b.length - a.length)[0];
  }

  private noRoots(what: string): SdmeshError {
    return permissionDenied(
      `${what}: no storage roots are configured on ${this.service}, so it uses no storage domain; set ${STORAGE_ROOTS_FLAG} (${STORAGE_ROOTS_ENV}) to the shared storage directories domains may live in`,
      Reason.NO_STORAGE_ROOTS,
    );
  }

  /**
   * A domain path (validated and normalized) that lies beneath a configured root.
   * PERMISSION_DENIED NO_STORAGE_ROOTS / DOMAIN_OUTSIDE_STORAGE_ROOTS otherwise.
   */
  requireUnder(domainPath: string, what = 'storage domain path'): string {
    const p = validateDomainPath(domainPath);
    if (!this.configured) throw this.noRoots(`${what} ${p}`);
    if (this.roots.includes(p)) {
      throw invalidArgument(
        `${what} ${p} is a storage root itself; a domain is a directory beneath a root (storage roots: ${this.roots.join(', ')})`,
        Reason.DOMAIN_IS_STORAGE_ROOT,
      );
    }
    if (!this.rootOf(p)) {
      throw permissionDenied(
        `${what} ${p} is outside every storage root of ${this.service} (${this.roots.join(', ')}): refused`,
        Reason.DOMAIN_OUTSIDE_STORAGE_ROOTS,
      );
    }
    return p;
  }

  /**
   * Where a new domain may go, judged from the domains already known (no file access: the
   * scheduler). INVALID_ARGUMENT DOMAIN_INSIDE_DOMAIN / DOMAIN_CONTAINS_DOMAIN; the same path
   * as a known domain is left to the caller (a retry or DOMAIN_PATH_IN_USE).
   */
  checkNewDomainPath(domainPath: string, known: readonly KnownDomain[]): string {
    const p = this.requireUnder(domainPath);
    for (const d of known) {
      const other = path.resolve(d.path);
      if (p.startsWith(other + '/')) throw insideDomain(p, other, d.id);
      if (other.startsWith(p + '/')) throw containsDomain(p, other, d.id);
    }
    return p;
  }

  /**
   * The same on the storage itself (a host that mounts it): every directory from the root down
   * to the path is a real directory (no symlink, no other file system) that is not a domain
   * (no dom_md/metadata), and no directory below the path (a bounded scan, links never
   * followed) is a domain. An existing domain at the path itself passes (a retry of its
   * format is decided by the caller).
   */
  async checkNewDomainOnStorage(domainPath: string): Promise<string> {
    const p = this.requireUnder(domainPath);
    const root = this.rootOf(p)!;
    const confined = new ConfinedRoot(root);
    const isDomain = async (dir: string) => (await confined.lstat(path.join(dir, 'dom_md', 'metadata'))) !== undefined;
    // The root and every directory between it and the path.
    const rel = path.relative(root, p).split('/');
    let dir = root;
    for (let i = 0; i < rel.length; i++) {
      const type = await confined.typeOf(dir);
      if (type === 'absent') return p; // nothing below exists: nothing to be inside or above
      if (type !== 'directory')
        throw fail(
          type === 'symlink' ? Reason.SYMLINK_REFUSED : Reason.INVALID_PATH,
          `${dir} (on the way to ${p}) is ${type === 'symlink' ? 'a symbolic link' : `not a directory (${type})`}: refused`,
        );
      if (await isDomain(dir)) throw insideDomain(p, dir);
      dir = path.join(dir, rel[i]!);
    }
    const type = await confined.typeOf(p);
    if (type === 'absent') return p;
    if (type !== 'directory') {
      throw fail(
        type === 'symlink' ? Reason.SYMLINK_REFUSED : Reason.INVALID_PATH,
        `storage domain path ${p} is ${type === 'symlink' ? 'a symbolic link' : `not a directory (${type})`}: refused`,
      );
    }
    if (await isDomain(p)) return p;
    // Breadth-first below the path, lstat semantics: symlinks and other types are not entered.
    let level = [p];
    let listed = 0;
    for (let depth = 1; depth <= NESTING_SCAN_MAX_DEPTH && level.length > 0; depth++) {
      const next: string[] = [];
      for (const d of level) {
        const names = await confined.listNames(d, ['directory'] as EntryType[]);
        listed += names.length;
        if (listed > NESTING_SCAN_MAX_ENTRIES) {
          throw invalidArgument(
            `storage domain path ${p} holds more than ${NESTING_SCAN_MAX_ENTRIES} directories; refusing to create a domain above them`,
            Reason.DOMAIN_PATH_NOT_EMPTY,
          );
        }
        for (const name of names) {
          const child = path.join(d, name);
          if (name === 'dom_md' && (await confined.lstat(path.join(child, 'metadata')))) throw containsDomain(p, d);
          next.push(child);
        }
      }
      level = next;
    }
    return p;
  }
}

function insideDomain(p: string, other: string, id?: string): SdmeshError {
  return invalidArgument(`storage domain path ${p} is inside storage domain ${id ? `${id} ` : ''}at ${other}: domains never nest`, Reason.DOMAIN_INSIDE_DOMAIN);
}

function containsDomain(p: string, other: string, id?: string): SdmeshError {
  return invalidArgument(
    `storage domain path ${p} contains storage domain ${id ? `${id} ` : ''}at ${other}: domains never nest`,
    Reason.DOMAIN_CONTAINS_DOMAIN,
  );
}
