import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { ExportHandle } from '@sdmesh/common';

/**
 * What the node plugin made for one staged volume, recorded before and after each step, so a
 * restarted plugin finds its storage daemon, loop device and mounts again and tears down
 * exactly those (never a loop device or mount it did not make).
 */
export interface StagedVolume {
  volumeId: string;
  stagingPath: string;
  access: 'block' | 'mount';
  /** mount access: the file system type on the device ('' for block). */
  fsType: string;
  mountFlags: string[];
  readOnly: boolean;
  /** The leaf's lease is shared (multi-node access), not exclusive. */
  sharedLease: boolean;
  domain: { id: string; path: string };
  imageId: string;
  leafVolumeId: string;
  export: ExportHandle;
  /** The FUSE file the export mounts; the loop device sits on it. */
  exportFile: string;
  /** '' until attached. */
  loopDevice: string;
  /** mount access: whether the file system is mounted at stagingPath. */
  mounted: boolean;
  /** Target paths published, with their readonly flag. */
  published: Record<string, { readOnly: boolean }>;
}

export class NodeState {
  readonly volumesDir: string;
  readonly exportsDir: string;

  constructor(readonly dir: string) {
    this.volumesDir = path.join(dir, 'volumes');
    this.exportsDir = path.join(dir, 'exports');
    fs.mkdirSync(this.volumesDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(this.exportsDir, { recursive: true, mode: 0o700 });
  }

  /** A file-name-safe key of a volume id (ids are up to 128 arbitrary characters). */
  static key(volumeId: string): string {
    return createHash('sha256').update(volumeId).digest('hex').slice(0, 32);
  }

  private file(volumeId: string): string {
    return path.join(this.volumesDir, `${NodeState.key(volumeId)}.json`);
  }

  get(volumeId: string): StagedVolume | undefined {
    try {
      return JSON.parse(fs.readFileSync(this.file(volumeId), 'utf8')) as StagedVolume;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  list(): StagedVolume[] {
    return fs
      .readdirSync(this.volumesDir)
      .filter((n) => n.endsWith('.json'))
      .flatMap((n) => {
        try {
          return [JSON.parse(fs.readFileSync(path.join(this.volumesDir, n), 'utf8')) as StagedVolume];
        } catch {
          return [];
        }
      });
  }

  /** Durable before it returns: temp file, fsync, rename, directory fsync. */
  put(v: StagedVolume): void {
    const file = this.file(v.volumeId);
    const tmp = `${file}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify(v, null, 1));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    const dfd = fs.openSync(this.volumesDir, 'r');
    try {
      fs.fsyncSync(dfd);
    } finally {
      fs.closeSync(dfd);
    }
  }

  remove(volumeId: string): void {
    fs.rmSync(this.file(volumeId), { force: true });
  }
}
