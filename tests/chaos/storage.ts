import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * Storage faults of a chaos run (docs/chaos.md): a domain on its own small file system that a
 * fault fills up (ENOSPC), and block I/O throttling of chosen processes of the mesh (a slow
 * storage path; a host's lockspace made unwritable). Both need root: a loop device, and a cgroup
 * blkio (v1) or io (v2) controller the harness may create groups in.
 */

/** "major:minor" of a block device number (st_dev / st_rdev). */
function majMin(dev: number): string {
  const major = Number((BigInt(dev) >> 8n) & 0xfffn) | Number((BigInt(dev) >> 32n) & ~0xfffn);
  const minor = Number(BigInt(dev) & 0xffn) | Number((BigInt(dev) >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** The whole disk holding a directory (throttle rules name disks, not partitions). */
export function diskOf(dir: string): string {
  const dev = majMin(fs.statSync(dir).dev);
  const sys = `/sys/dev/block/${dev}`;
  if (fs.existsSync(path.join(sys, 'partition'))) return fs.readFileSync(path.join(sys, '..', 'dev'), 'utf8').trim();
  return dev;
}

/**
 * An ext4 file system on a loop device over a sparse file, mounted at `mountPoint`. Data writes
 * use O_DIRECT, so tmpfs will not do; ext4 on loop honours it, and fills up for real.
 */
export class LoopFs {
  private fillers = 0;

  private constructor(
    readonly image: string,
    readonly device: string,
    readonly mountPoint: string,
  ) {}

  static async create(image: string, mountPoint: string, sizeBytes: number): Promise<LoopFs> {
    fs.mkdirSync(mountPoint, { recursive: true });
    fs.closeSync(fs.openSync(image, 'w'));
    fs.truncateSync(image, sizeBytes);
    const { stdout } = await run('losetup', ['--find', '--show', image]);
    const device = stdout.trim();
    try {
      await run('mkfs.ext4', ['-q', '-m', '0', device]);
      await run('mount', [device, mountPoint]);
    } catch (err) {
      await run('losetup', ['-d', device]).catch(() => undefined);
      throw err;
    }
    return new LoopFs(image, device, mountPoint);
  }

  /** The device's "major:minor". */
  get disk(): string {
    return majMin(fs.statSync(this.device).rdev);
  }

  /** Free bytes now. */
  free(): number {
    const st = fs.statfsSync(this.mountPoint);
    return st.bfree * st.bsize;
  }

  /**
   * Fills the file system with a file outside the domain's directory (but on its file system),
   * leaving `leaveBytes` free (0: full). Returns the filler's path; `unfill` removes it.
   */
  async fill(leaveBytes = 0): Promise<string> {
    const file = path.join(this.mountPoint, `filler-${++this.fillers}`);
    let want = this.free() - leaveBytes;
    // fallocate needs blocks for its own extent tree: step down until it fits.
    while (want > 0) {
      try {
        await run('fallocate', ['-l', String(want), file]);
        break;
      } catch {
        fs.rmSync(file, { force: true });
        want -= 1024 * 1024;
      }
    }
    // The last blocks (fallocate leaves some): plain writes until ENOSPC, when full is asked for.
    if (leaveBytes === 0) {
      const fd = fs.openSync(`${file}-tail`, 'w');
      const block = Buffer.alloc(4096);
      try {
        for (;;) fs.writeSync(fd, block);
      } catch {
        // ENOSPC: full
      } finally {
        fs.closeSync(fd);
      }
    }
    return file;
  }

  /** Removes every filler. */
  unfill(): void {
    for (const e of fs.readdirSync(this.mountPoint)) if (e.startsWith('filler-')) fs.rmSync(path.join(this.mountPoint, e), { force: true });
  }

  async destroy(): Promise<void> {
    this.unfill();
    // A lazy unmount: a process the mesh killed a moment ago may still hold a file open.
    await run('umount', ['-l', this.mountPoint]).catch(() => undefined);
    // Detached once the last user is gone (autoclear); retried while the lazy unmount drains.
    for (let attempt = 0; attempt < 10; attempt++) {
      await run('losetup', ['-d', this.device]).catch(() => undefined);
      const { stdout } = await run('losetup', ['-a']).catch(() => ({ stdout: '' }));
      if (!stdout.includes(this.image)) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    fs.rmSync(this.image, { force: true });
  }
}

/** Per-disk limits; 0 or absent = unlimited. */
export interface IoLimits {
  readBps?: number;
  writeBps?: number;
  readIops?: number;
  writeIops?: number;
}

type Controller = { kind: 'v1'; root: string } | { kind: 'v2'; root: string };

/**
 * Block I/O throttling of chosen processes: a cgroup of its own (blkio.throttle.* in cgroup v1,
 * io.max in v2) that the harness moves the processes into and, at the end, back out of. The
 * kernel delays their direct I/O to the named disks (the page cache is not throttled, which
 * does not matter: the mesh's data and lease I/O is O_DIRECT).
 */
export class IoThrottle {
  private readonly homes = new Map<number, string>();

  private constructor(
    private readonly controller: Controller,
    readonly dir: string,
  ) {}

  /** Where throttling is possible here, or why not. */
  static controller(): Controller | string {
    const v1 = '/sys/fs/cgroup/blkio';
    if (fs.existsSync(path.join(v1, 'blkio.throttle.write_bps_device'))) return { kind: 'v1', root: v1 };
    for (const v2 of ['/sys/fs/cgroup', '/sys/fs/cgroup/unified']) {
      const controllers = path.join(v2, 'cgroup.controllers');
      if (fs.existsSync(controllers)) {
        if (fs.readFileSync(controllers, 'utf8').split(/\s+/).includes('io')) return { kind: 'v2', root: v2 };
      }
    }
    return 'no cgroup blkio (v1) hierarchy and no cgroup v2 with the io controller';
  }

  static create(name: string): IoThrottle {
    const c = IoThrottle.controller();
    if (typeof c === 'string') throw new Error(`I/O throttling unavailable: ${c}`);
    const dir = path.join(c.root, name);
    fs.mkdirSync(dir, { recursive: true });
    if (c.kind === 'v2') {
      // The io controller must be on for the groups below the root.
      fs.writeFileSync(path.join(c.root, 'cgroup.subtree_control'), '+io');
    }
    return new IoThrottle(c, dir);
  }

  /** Sets the limits on each disk ("major:minor"); all zero lifts them. */
  limit(disks: string[], l: IoLimits): void {
    for (const disk of disks) {
      if (this.controller.kind === 'v1') {
        const set = (file: string, v = 0) => fs.writeFileSync(path.join(this.dir, `blkio.throttle.${file}`), `${disk} ${v}`);
        set('read_bps_device', l.readBps);
        set('write_bps_device', l.writeBps);
        set('read_iops_device', l.readIops);
        set('write_iops_device', l.writeIops);
      } else {
        const v = (n?: number) => (n ? String(n) : 'max');
        fs.writeFileSync(path.join(this.dir, 'io.max'), `${disk} rbps=${v(l.readBps)} wbps=${v(l.writeBps)} riops=${v(l.readIops)} wiops=${v(l.writeIops)}`);
      }
    }
  }

  /** The cgroup path of a pid in this controller's hierarchy (relative to its root). */
  private cgroupOf(pid: number): string | undefined {
    try {
      const lines = fs.readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n');
      const mine = this.controller.kind === 'v1' ? lines.find((l) => l.split(':')[1]?.split(',').includes('blkio')) : lines.find((l) => l.startsWith('0::'));
      return mine?.slice(mine.indexOf(':', mine.indexOf(':') + 1) + 1);
    } catch {
      return undefined;
    }
  }

  /** Moves processes (of the mesh the harness started) in; returns those moved. */
  add(pids: number[]): number[] {
    const moved: number[] = [];
    for (const pid of pids) {
      const home = this.cgroupOf(pid);
      if (home === undefined) continue;
      try {
        fs.writeFileSync(path.join(this.dir, 'cgroup.procs'), String(pid));
        if (!this.homes.has(pid)) this.homes.set(pid, home);
        moved.push(pid);
      } catch {
        // gone meanwhile
      }
    }
    return moved;
  }

  /** Every process in the group now (children forked inside it included). */
  members(): number[] {
    try {
      return fs.readFileSync(path.join(this.dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
    } catch {
      return [];
    }
  }

  /** Moves every member back where it came from (a child forked inside: where its first ancestor came from). */
  releaseAll(disks: string[]): void {
    this.limit(disks, {});
    const fallback = [...this.homes.values()][0] ?? '/';
    for (const pid of this.members()) {
      const home = this.homes.get(pid) ?? fallback;
      try {
        fs.writeFileSync(path.join(this.controller.root, home, 'cgroup.procs'), String(pid));
      } catch {
        // gone meanwhile
      }
    }
    this.homes.clear();
  }

  destroy(disks: string[]): void {
    this.releaseAll(disks);
    try {
      fs.rmdirSync(this.dir);
    } catch {
      // a process that is exiting may still be listed for a moment; the next run's group has its own name
    }
  }
}
