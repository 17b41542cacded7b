import fs from 'node:fs';
import path from 'node:path';
import { parseStorageRoots, SdmeshError, StorageRoots } from '@sdmesh/common';
import { makeTestDir, removeTestDir } from '../harness/paths';

/** Storage roots: where domains may be created (real directories, lstat/openat2 checks). */
const codeOf = async (p: Promise<unknown> | (() => unknown)): Promise<[string, string] | 'ok'> => {
  try {
    await (typeof p === 'function' ? p() : p);
    return 'ok';
  } catch (err) {
    const e = SdmeshError.from(err);
    return [e.reason, e.message];
  }
};

describe('storage roots', () => {
  const dir = makeTestDir('roots');
  const root = path.join(dir, 'storage');
  const other = path.join(dir, 'elsewhere');
  const makeDomain = (p: string) => {
    fs.mkdirSync(path.join(p, 'dom_md'), { recursive: true });
    fs.writeFileSync(path.join(p, 'dom_md', 'metadata'), 'x');
  };
  beforeAll(() => {
    fs.mkdirSync(root, { recursive: true });
    fs.mkdirSync(other, { recursive: true });
    makeDomain(path.join(root, 'dom1'));
    makeDomain(path.join(root, 'group', 'deep', 'er', 'dom2'));
    fs.mkdirSync(path.join(root, 'empty'));
    fs.symlinkSync(other, path.join(root, 'link'));
  });
  afterAll(() => removeTestDir(dir));

  it('parses and refuses bad roots', () => {
    expect(parseStorageRoots(' /a/b/ ,/c,/a/b')).toEqual(['/a/b', '/c']);
    expect(parseStorageRoots('')).toEqual([]);
    expect(() => parseStorageRoots('rel/dir')).toThrow(/not an absolute path/);
    expect(() => parseStorageRoots('/')).toThrow(/storage root \/ is refused/);
    expect(() => parseStorageRoots('/proc/1')).toThrow(/inside \/proc/);
    expect(() => parseStorageRoots('/a/../b')).toThrow(/\.\./);
  });

  it('with no roots every domain path is refused, naming the option', async () => {
    const none = new StorageRoots('', 'metadata-tx on h1');
    const r = await codeOf(() => none.requireUnder(path.join(root, 'x')));
    expect(r).not.toBe('ok');
    expect(r[0]).toBe('NO_STORAGE_ROOTS');
    expect(r[1]).toMatch(/--storage-roots \(SDMESH_STORAGE_ROOTS\)/);
    expect(r[1]).toMatch(/metadata-tx on h1/);
    expect((await codeOf(none.checkNewDomainOnStorage(path.join(root, 'x'))))[0]).toBe('NO_STORAGE_ROOTS');
  });

  it('lexical checks (the scheduler): outside, the root itself, inside or above a known domain', async () => {
    const roots = new StorageRoots(root);
    const known = [{ id: 'd1', path: path.join(root, 'dom1') }];
    expect(roots.checkNewDomainPath(path.join(root, 'new'), known)).toBe(path.join(root, 'new'));
    expect(roots.checkNewDomainPath(path.join(root, 'dom1'), known)).toBe(path.join(root, 'dom1')); // same path: the caller decides
    expect((await codeOf(() => roots.checkNewDomainPath(path.join(other, 'x'), known)))[0]).toBe('DOMAIN_OUTSIDE_STORAGE_ROOTS');
    expect((await codeOf(() => roots.checkNewDomainPath(root + '-sibling/x', known)))[0]).toBe('DOMAIN_OUTSIDE_STORAGE_ROOTS');
    expect((await codeOf(() => roots.checkNewDomainPath(root, known)))[0]).toBe('DOMAIN_IS_STORAGE_ROOT');
    const inside = await codeOf(() => roots.checkNewDomainPath(path.join(root, 'dom1', 'images', 'x'), known));
    expect(inside[0]).toBe('DOMAIN_INSIDE_DOMAIN');
    expect(inside[1]).toMatch(/inside storage domain d1 at/);
    expect((await codeOf(() => roots.checkNewDomainPath(path.join(root, 'a'), [{ id: 'd2', path: path.join(root, 'a', 'b') }])))[0]).toBe(
      'DOMAIN_CONTAINS_DOMAIN',
    );
    expect((await codeOf(() => roots.checkNewDomainPath('relative', known)))[0]).toBe('INVALID_PATH');
  });

  it('on the storage: inside a domain, above one (deep), through a symlink → refused; fresh or empty paths pass', async () => {
    const roots = new StorageRoots(root);
    expect(await roots.checkNewDomainOnStorage(path.join(root, 'fresh', 'new'))).toBe(path.join(root, 'fresh', 'new'));
    expect(await roots.checkNewDomainOnStorage(path.join(root, 'empty'))).toBe(path.join(root, 'empty'));
    expect(await roots.checkNewDomainOnStorage(path.join(root, 'dom1'))).toBe(path.join(root, 'dom1')); // itself: a retry
    expect((await codeOf(roots.checkNewDomainOnStorage(path.join(root, 'dom1', 'images', 'nested'))))[0]).toBe('DOMAIN_INSIDE_DOMAIN');
    const above = await codeOf(roots.checkNewDomainOnStorage(path.join(root, 'group')));
    expect(above[0]).toBe('DOMAIN_CONTAINS_DOMAIN');
    expect(above[1]).toContain(path.join(root, 'group', 'deep', 'er', 'dom2'));
    expect((await codeOf(roots.checkNewDomainOnStorage(path.join(root, 'link', 'x'))))[0]).toBe('SYMLINK_REFUSED');
    expect((await codeOf(roots.checkNewDomainOnStorage(path.join(root, 'link'))))[0]).toBe('SYMLINK_REFUSED');
    expect((await codeOf(roots.checkNewDomainOnStorage(path.join(other, 'x'))))[0]).toBe('DOMAIN_OUTSIDE_STORAGE_ROOTS');
    expect(fs.existsSync(path.join(other, 'x'))).toBe(false);
  });

  it('a directory symlink below the path is not followed by the scan', async () => {
    const roots = new StorageRoots(root);
    const p = path.join(root, 'has-link');
    fs.mkdirSync(p);
    fs.symlinkSync(path.join(root, 'dom1'), path.join(p, 'to-dom1'));
    expect(await roots.checkNewDomainOnStorage(p)).toBe(p);
  });
});
