import fs from 'node:fs';
import path from 'node:path';
import { rehearseCopySteps } from '../../services/data-mover/src/warm-up';

/** The warm worker's rehearsal of a copy's storage steps runs on a scratch domain of its own and leaves nothing behind. */
describe('data-mover worker rehearsal', () => {
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-rehearsal-test-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads, checks, opens and writes its own volumes, then removes its domain', async () => {
    const seen: string[] = [];
    const watcher = fs.watch(dir, (_event, name) => name && seen.push(name));
    try {
      await rehearseCopySteps(1, dir);
      await rehearseCopySteps(1, dir);
    } finally {
      watcher.close();
    }
    expect(fs.readdirSync(dir)).toEqual([]);
    // It did work in the temp dir (two scratch domains came and went), not elsewhere.
    expect(new Set(seen.filter((n) => n.startsWith('sdmesh-worker-rehearsal-'))).size).toBe(2);
  });

  it('stops when a job came (what is left would compete with it), still leaving nothing behind', async () => {
    let checks = 0;
    await rehearseCopySteps(1, dir, () => ++checks > 0);
    // It stopped at its first check, after writing its scratch volumes and before reading them.
    expect(checks).toBe(1);
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});
