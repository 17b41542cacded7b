import fs from 'node:fs';
import path from 'node:path';
import { ConfinedRoot, descriptor, DIRECTORY_MODE, Reason, RECORD_FILE_MODE, SdmeshError, VOLUME_FILE_MODE } from '@sdmesh/common';
import * as sanlock from '@sdmesh/sanlock';

/**
 * Confined steps (issue 17): lstat, mkdir, a new file written whole, a directory fsync and a
 * rename each run as one native thread-pool job. They must refuse exactly what the step-by-step
 * code refuses (symlinks anywhere, names outside the root, existing names) and create exactly
 * the same modes. Each case runs with the native steps and with the step-by-step fallback (what
 * an addon built before them gets), and both must answer alike.
 */
const modes = [
  ['native steps', () => undefined],
  ['step-by-step fallback', () => jest.spyOn(sanlock, 'confinedSteps').mockReturnValue(undefined)],
] as const;

describe.each(modes)('confined steps: %s', (_name, setUp) => {
  let base: string;
  let root: string;
  let outside: string;
  let dom: ConfinedRoot;
  let fallback: jest.SpyInstance | undefined;
  const reasonOf = async (p: Promise<unknown>) => {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SdmeshError);
    return (err as SdmeshError).reason;
  };
  const mode = (p: string) => fs.lstatSync(p).mode & 0o7777;

  beforeAll(() => {
    expect(sanlock.confinedSteps()).toBeDefined(); // the built addon has them: the native case is real
  });
  beforeEach(() => {
    base = fs.mkdtempSync('/var/tmp/sdmesh-confined-steps-');
    root = path.join(base, 'dom');
    outside = path.join(base, 'outside');
    fs.mkdirSync(path.join(root, 'images'), { recursive: true });
    fs.mkdirSync(outside);
    fs.writeFileSync(path.join(outside, 'secret'), 'secret');
    fs.symlinkSync(outside, path.join(root, 'images', 'link'));
    fs.symlinkSync(path.join(outside, 'secret'), path.join(root, 'images', 'file-link'));
    dom = new ConfinedRoot(root);
    fallback = setUp();
  });
  afterEach(() => {
    jest.restoreAllMocks();
    fs.rmSync(base, { recursive: true, force: true });
  });

  it('creates files and directories with exact modes (umask does not apply), written whole and durable', async () => {
    const old = process.umask(0o077);
    try {
      await dom.mkdir(path.join(root, 'images', 'img'));
      const record = path.join(root, 'images', 'img', 'v.meta');
      const volume = path.join(root, 'images', 'img', 'v');
      expect(await dom.writeNewFile(record, 'record', { data: Buffer.from('RECORD=x\n') })).toBeGreaterThanOrEqual(0);
      expect(await dom.writeNewFile(volume, 'volume', { truncateTo: 1 << 20 })).toBe(fs.statSync(volume).blocks * 512);
      const fd = await dom.createFileDescriptor(path.join(root, 'images', 'img', 'w'), 'volume');
      await descriptor.write(fd, Buffer.from('abc'));
      await descriptor.syncAndClose(fd);
      expect(mode(path.join(root, 'images', 'img'))).toBe(DIRECTORY_MODE);
      expect(mode(record)).toBe(RECORD_FILE_MODE);
      expect(mode(volume)).toBe(VOLUME_FILE_MODE);
      expect(fs.readFileSync(record, 'utf8')).toBe('RECORD=x\n');
      expect(fs.statSync(volume).size).toBe(1 << 20);
      expect(fs.readFileSync(path.join(root, 'images', 'img', 'w'), 'utf8')).toBe('abc');
      // The fallback case really ran without the native steps.
      if (fallback) expect(fallback.mock.results.every((r) => r.value === undefined) && fallback.mock.calls.length >= 4).toBe(true);
    } finally {
      process.umask(old);
    }
  });

  it('never creates over an existing name, a symlink included, and leaves what was there', async () => {
    const existing = path.join(root, 'images', 'x');
    fs.writeFileSync(existing, 'mine');
    expect(await reasonOf(dom.writeNewFile(existing, 'volume', { truncateTo: 4096 }))).toBe(Reason.ALREADY_EXISTS);
    expect(fs.readFileSync(existing, 'utf8')).toBe('mine');
    expect(await reasonOf(dom.writeNewFile(path.join(root, 'images', 'file-link'), 'record', { data: Buffer.from('x') }))).toBe(Reason.ALREADY_EXISTS);
    expect(await reasonOf(dom.mkdir(path.join(root, 'images', 'link')))).toBe(Reason.ALREADY_EXISTS);
    expect(fs.readFileSync(path.join(outside, 'secret'), 'utf8')).toBe('secret');
  });

  it('refuses to pass through a symlink in any step; nothing is made outside the root', async () => {
    const through = (name: string) => path.join(root, 'images', 'link', name);
    expect(await reasonOf(dom.mkdir(through('d')))).toBe(Reason.SYMLINK_REFUSED);
    expect(await reasonOf(dom.writeNewFile(through('f'), 'volume', { truncateTo: 4096 }))).toBe(Reason.SYMLINK_REFUSED);
    expect(await reasonOf(dom.createFileDescriptor(through('g'), 'record'))).toBe(Reason.SYMLINK_REFUSED);
    expect(await reasonOf(dom.fsyncDir(path.join(root, 'images', 'link')))).toBe(Reason.SYMLINK_REFUSED);
    expect(await reasonOf(dom.rename(through('secret'), path.join(root, 'images', 'stolen')))).toBe(Reason.SYMLINK_REFUSED);
    expect(await reasonOf(dom.lstat(through('secret')))).toBe(Reason.SYMLINK_REFUSED);
    expect(fs.readdirSync(outside)).toEqual(['secret']);
    expect(await reasonOf(dom.mkdir(path.join(root, '..', 'escape')))).toBe(Reason.PATH_OUTSIDE_DOMAIN);
    expect(fs.existsSync(path.join(base, 'escape'))).toBe(false);
  });

  it('lstat reports a symlink as one (never followed), the root itself, and nothing for a missing name', async () => {
    expect((await dom.lstat(path.join(root, 'images', 'link')))?.isSymbolicLink()).toBe(true);
    expect(await dom.typeOf(path.join(root, 'images', 'file-link'))).toBe('symlink');
    expect(await dom.typeOf(root)).toBe('directory');
    expect(await dom.lstat(path.join(root, 'images', 'none'))).toBeUndefined();
    const st = await dom.lstat(path.join(root, 'images'));
    const real = fs.lstatSync(path.join(root, 'images'));
    expect([st?.isDirectory(), st?.ino, st?.dev, st?.mtimeMs, st?.ctimeMs]).toEqual([true, real.ino, real.dev, real.mtimeMs, real.ctimeMs]);
  });

  it('renames a symlink itself (never its target), within and across directories', async () => {
    await dom.mkdir(path.join(root, 'images', 'other'));
    await dom.rename(path.join(root, 'images', 'file-link'), path.join(root, 'images', 'other', 'moved'));
    expect(fs.lstatSync(path.join(root, 'images', 'other', 'moved')).isSymbolicLink()).toBe(true);
    expect(fs.readFileSync(path.join(outside, 'secret'), 'utf8')).toBe('secret');
    expect(await reasonOf(dom.rename(path.join(root, 'images', 'gone'), path.join(root, 'images', 'x')))).toBe(Reason.NOT_FOUND);
    await dom.fsyncDir(path.join(root, 'images', 'other'));
    await dom.fsyncDir(root);
  });
});
