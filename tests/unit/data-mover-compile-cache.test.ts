import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { workerCompileCacheDir } from '../../services/data-mover/src/jobs';

/** The copy workers' node compile cache directory: this user's only, or none. */
describe('workerCompileCacheDir', () => {
  const bases: string[] = [];
  const base = () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'dm-compile-cache-'));
    bases.push(d);
    return d;
  };
  const expectedName = (b: string) => path.join(b, `sdmesh-data-mover-compile-cache-${process.getuid!()}`);
  afterAll(() => bases.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

  it('creates a directory only this user can enter, and finds it again', () => {
    const b = base();
    const dir = workerCompileCacheDir(b);
    expect(dir).toBe(expectedName(b));
    expect(fs.statSync(dir!).mode & 0o777).toBe(0o700);
    expect(workerCompileCacheDir(b)).toBe(dir);
  });

  it('uses no cache when the directory others may write, is a link, or is not a directory', () => {
    const open = base();
    fs.mkdirSync(expectedName(open), { mode: 0o700 });
    fs.chmodSync(expectedName(open), 0o777);
    expect(workerCompileCacheDir(open)).toBeUndefined();

    const linked = base();
    const target = fs.mkdtempSync(path.join(linked, 'elsewhere-'));
    fs.chmodSync(target, 0o700);
    fs.symlinkSync(target, expectedName(linked));
    expect(workerCompileCacheDir(linked)).toBeUndefined();

    const file = base();
    fs.writeFileSync(expectedName(file), '');
    expect(workerCompileCacheDir(file)).toBeUndefined();

    expect(workerCompileCacheDir(path.join(file, 'missing', 'deeper'))).toBeUndefined();
  });
});
