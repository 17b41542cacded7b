import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fail, isMountPoint, Reason } from '@sdmesh/common';

/**
 * The host programs the node plugin runs (util-linux, e2fsprogs, xfsprogs): loop devices,
 * mounts, file systems. Each failure is INTERNAL NODE_ATTACH_FAILED with the program's message.
 */
export function run(file: string, args: string[], opts: { okCodes?: number[] } = {}): Promise<{ stdout: string; code: number }> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { encoding: 'utf8', timeout: 600_000, maxBuffer: 4 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      if (!err || opts.okCodes?.includes(code)) return resolve({ stdout, code });
      const detail = (stderr || err.message).trim().split('\n').slice(-3).join(' ');
      reject(fail(Reason.NODE_ATTACH_FAILED, `${file} ${args.join(' ')} failed: ${detail}`));
    });
  });
}

/** Attaches a file to a free loop device with direct I/O (no page cache between the device and the export). */
export async function attachLoop(file: string, readOnly: boolean): Promise<string> {
  const { stdout } = await run('losetup', ['--find', '--show', '--direct-io=on', ...(readOnly ? ['--read-only'] : []), file]);
  const dev = stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw fail(Reason.NODE_ATTACH_FAILED, `losetup gave no loop device for ${file} ("${dev}")`);
  return dev;
}

/** The file a loop device is attached to, or undefined when it is free (from sysfs). */
export function loopBackingFile(dev: string): string | undefined {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(dev)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** The loop devices attached to `file` now (from sysfs). */
export function loopDevicesOn(file: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync('/sys/block').filter((n) => /^loop\d+$/.test(n));
  } catch {
    return [];
  }
  return names.filter((n) => loopBackingFile(`/dev/${n}`) === file).map((n) => `/dev/${n}`);
}

/** Detaches a loop device only if it is still attached to `file` (never someone else's). */
export async function detachLoop(dev: string, file: string): Promise<void> {
  const backing = loopBackingFile(dev);
  if (backing === undefined) return;
  if (backing !== file && backing !== `${file} (deleted)`) return;
  await run('losetup', ['-d', dev]);
}

/** Re-reads the loop device's size from its file (after the export grew). */
export async function refreshLoopCapacity(dev: string): Promise<void> {
  await run('losetup', ['-c', dev]);
}

export async function blockDeviceSize(dev: string): Promise<number> {
  return Number((await run('blockdev', ['--getsize64', dev])).stdout.trim());
}

/** The file system type blkid finds on a device ('' when there is none). */
export async function fileSystemType(dev: string): Promise<string> {
  // Exit code 2: nothing found.
  const { stdout } = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', dev], { okCodes: [2] });
  return stdout.trim();
}

export const SUPPORTED_FS = ['ext4', 'xfs'] as const;
export type FsType = (typeof SUPPORTED_FS)[number];

/** Whether a program is on PATH (the image carries e2fsprogs; xfsprogs only where installed). */
export function programAvailable(name: string): boolean {
  return (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':').some((dir) => dir && fs.existsSync(path.join(dir, name)));
}

export async function makeFileSystem(dev: string, fsType: FsType): Promise<void> {
  if (fsType === 'ext4') await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', dev]);
  else await run('mkfs.xfs', ['-q', '-K', dev]);
}

export async function mount(source: string, target: string, opts: { fsType?: string; options?: string[]; bind?: boolean }): Promise<void> {
  const args = [...(opts.bind ? ['--bind'] : []), ...(opts.fsType ? ['-t', opts.fsType] : [])];
  if (opts.options?.length) args.push('-o', opts.options.join(','));
  await run('mount', [...args, source, target]);
}

/** A read-only bind mount: bind, then remount the bind read-only (one mount call can't do both). */
export async function bindMount(source: string, target: string, readOnly: boolean): Promise<void> {
  await mount(source, target, { bind: true });
  if (readOnly) await run('mount', ['-o', 'remount,bind,ro', target]);
}

/** Unmounts while something is mounted there (stacked mounts too); nothing mounted is fine. */
export async function unmountAll(target: string): Promise<void> {
  for (let i = 0; i < 8 && isMountPoint(target); i++) await run('umount', [target]);
}

/** Grows the file system on a device to the device's size (both online). */
export async function growFileSystem(fsType: string, dev: string, mountpoint: string): Promise<void> {
  if (fsType === 'xfs') await run('xfs_growfs', [mountpoint]);
  else await run('resize2fs', [dev]);
}

export interface FsUsage {
  total: number;
  available: number;
  used: number;
  inodes: number;
  inodesFree: number;
}

export async function fileSystemUsage(p: string): Promise<FsUsage> {
  const s = await fs.promises.statfs(p);
  return {
    total: s.blocks * s.bsize,
    available: s.bavail * s.bsize,
    used: (s.blocks - s.bfree) * s.bsize,
    inodes: s.files,
    inodesFree: s.ffree,
  };
}
