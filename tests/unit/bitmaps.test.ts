import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { GrpcStatus, isValidBitmap, parseBitmaps, QemuBitmaps, SdmeshError, validateBitmapName, type DirtyBitmap } from '@sdmesh/common';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The reusable bitmap module on real qcow2 files (qemu-img, no daemon): names, list/add/remove/clear,
 * merge, and the chain rules taken from vdsm (carry valid bitmaps to a new leaf, merge top into base,
 * prune stale ones).
 */

const dir = makeTestDir('bitmaps');
afterAll(() => removeTestDir(dir));

const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { stdio: 'pipe' }).toString();
let n = 0;
function qcow2(opts: { compat?: string; backing?: string } = {}): string {
  const file = path.join(dir, `v${++n}.qcow2`);
  const args = ['create', '-q', '-f', 'qcow2', '-o', `compat=${opts.compat ?? '1.1'}`];
  if (opts.backing) args.push('-u', '-b', path.basename(opts.backing), '-F', 'qcow2');
  qemuImg(...args, file, '64M');
  return file;
}
const open = (file: string, write = true) => fs.promises.open(file, write ? 'r+' : 'r');
const names = (bs: DirtyBitmap[]) => bs.map((b) => b.name).sort();
const bitmapsOf = (file: string) => parseBitmaps(qemuImg('info', '--output=json', '-f', 'qcow2', file));

async function withFiles<T>(files: string[], fn: (...h: fs.promises.FileHandle[]) => Promise<T>): Promise<T> {
  const handles = await Promise.all(files.map((f) => open(f)));
  try {
    return await fn(...handles);
  } finally {
    await Promise.all(handles.map((h) => h.close()));
  }
}

const bitmaps = new QemuBitmaps();

describe('bitmap names', () => {
  it.each(['b1', 'backup-2026-01-01', '0b6f5a3e-1111-4222-8333-944444444444', 'a.b:c_d', 'x'.repeat(128)])('accepts %s', (name) => {
    expect(validateBitmapName(name)).toBe(name);
  });
  it.each([
    ['empty', ''],
    ['too long', 'x'.repeat(129)],
    ['an option', '--remove'],
    ['a leading dot', '.hidden'],
    ['a path', '../../etc/passwd'],
    ['a slash', 'a/b'],
    ['a space', 'a b'],
    ['a control character', 'a\nb'],
    ['non-ASCII', 'bitmäp'],
    ['a json spec', 'json:{}'],
  ])('refuses %s', (_what, name) => {
    let err: unknown;
    try {
      validateBitmapName(name);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SdmeshError);
    expect((err as SdmeshError).code).toBe(GrpcStatus.INVALID_ARGUMENT);
    expect((err as SdmeshError).reason).toBe('INVALID_BITMAP_NAME');
  });
  it('refuses a name that is not a string', () => {
    expect(() => validateBitmapName(7)).toThrow(/required/);
  });
});

describe('QemuBitmaps on real qcow2 files', () => {
  it('adds, lists, removes and clears', async () => {
    const f = qcow2();
    await withFiles([f], async (h) => {
      await bitmaps.add(h, 'b1');
      await bitmaps.add(h, 'b2', { granularity: 131072 });
      await bitmaps.add(h, 'off', { enabled: false });
      const listed = await bitmaps.list(h);
      expect(listed).toEqual([
        { name: 'b1', granularity: 65536, flags: ['auto'] },
        { name: 'b2', granularity: 131072, flags: ['auto'] },
        { name: 'off', granularity: 65536, flags: [] },
      ]);
      expect(listed.filter(isValidBitmap).map((b) => b.name)).toEqual(['b1', 'b2']);
      expect(await bitmaps.remove(h, 'b1')).toBe(true);
      expect(await bitmaps.remove(h, 'b1')).toBe(false);
      expect(names(await bitmaps.list(h))).toEqual(['b2', 'off']);
      expect((await bitmaps.clear(h)).sort()).toEqual(['b2', 'off']);
      expect(await bitmaps.list(h)).toEqual([]);
    });
    expect(bitmapsOf(f)).toEqual([]);
  });

  it('refuses a compat 0.10 file with QCOW2_COMPAT_TOO_OLD and a bad granularity with INVALID_ARGUMENT', async () => {
    await withFiles([qcow2({ compat: '0.10' })], async (h) => {
      await expect(bitmaps.add(h, 'b1')).rejects.toMatchObject({ code: GrpcStatus.FAILED_PRECONDITION, reason: 'QCOW2_COMPAT_TOO_OLD' });
    });
    await withFiles([qcow2()], async (h) => {
      await expect(bitmaps.add(h, 'b1', { granularity: 1000 })).rejects.toMatchObject({ code: GrpcStatus.INVALID_ARGUMENT });
      await expect(bitmaps.add(h, '-x')).rejects.toMatchObject({ reason: 'INVALID_BITMAP_NAME' });
      expect(await bitmaps.list(h)).toEqual([]);
    });
  });

  it('carries only valid bitmaps to a new leaf, with their granularity (vdsm add_bitmaps)', async () => {
    const parent = qcow2();
    const child = qcow2({ backing: parent });
    await withFiles([parent, child], async (p, c) => {
      await bitmaps.add(p, 'full', { granularity: 1 << 20 });
      await bitmaps.add(p, 'disabled', { enabled: false });
      expect(await bitmaps.carryTo(p, c)).toEqual(['full']);
      expect(await bitmaps.carryTo(p, c)).toEqual([]);
    });
    expect(bitmapsOf(child)).toEqual([{ name: 'full', granularity: 1 << 20, flags: ['auto'] }]);
    // The backing link of the leaf is untouched.
    expect(JSON.parse(qemuImg('info', '--output=json', '-f', 'qcow2', '-U', child))['backing-filename']).toBe(path.basename(parent));
  });

  it('merges a bitmap of one file into another, and top into base after a commit (vdsm merge_bitmaps, prune_bitmaps)', async () => {
    const base = qcow2();
    const top = qcow2({ backing: base });
    await withFiles([base, top], async (b, t) => {
      await bitmaps.add(b, 'shared');
      await bitmaps.add(t, 'shared');
      await bitmaps.add(t, 'new');
      await bitmaps.add(b, 'stale');
    });
    // A write through qemu-io marks 1 MiB dirty in top's enabled bitmaps.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 1M', top], { stdio: 'ignore' });
    await withFiles([base, top], async (b, t) => {
      expect((await bitmaps.mergeInto(t, b)).sort()).toEqual(['new', 'shared']);
      expect(names(await bitmaps.list(b))).toEqual(['new', 'shared', 'stale']);
      expect(await bitmaps.pruneStale(b, t)).toEqual(['stale']);
      expect(names(await bitmaps.list(b))).toEqual(['new', 'shared']);
    });
  });

  it('skips a bitmap with a hole in the chain (the base lacks it, the base parent has it)', async () => {
    const grand = qcow2();
    const base = qcow2({ backing: grand });
    const top = qcow2({ backing: base });
    await withFiles([grand, top], async (g, t) => {
      await bitmaps.add(g, 'holey');
      await bitmaps.add(t, 'holey');
    });
    await withFiles([base, top, grand], async (b, t, g) => {
      expect(await bitmaps.mergeInto(t, b, g)).toEqual([]);
      expect(await bitmaps.list(b)).toEqual([]);
    });
  });
});
