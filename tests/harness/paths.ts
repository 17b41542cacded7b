import fs from 'node:fs';
import path from 'node:path';
import { processRunning } from '@sdmesh/common';

export const REPO_ROOT = path.resolve(__dirname, '../..');

/**
 * A fresh work directory for one test suite, on a real filesystem (sanlock needs O_DIRECT,
 * which tmpfs lacks). Removed by the caller's cleanup unless SDMESH_KEEP_TEST_DIRS is set.
 */
export function makeTestDir(prefix: string): string {
  const base = process.env.SDMESH_TEST_DIR ?? '/var/tmp';
  fs.mkdirSync(base, { recursive: true });
  return fs.mkdtempSync(path.join(base, `sdmesh-${prefix}-`));
}

export function removeTestDir(dir: string): void {
  if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
}

/** Is this pid alive (and not a zombie)? */
export const pidAlive = processRunning;
