import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { BASE_ALLOCATION, dirtyBitmapContext, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdClient, NbdError } from '@sdmesh/common';
import { makeTestDir, removeTestDir } from '../harness/paths';

/**
 * The NBD client against a real qemu-nbd on a unix socket: negotiation, reads of data and holes,
 * writes, write-zeroes (punching holes), flush, base:allocation and dirty-bitmap block status,
 * refused ranges and a read-only export.
 */

const dir = makeTestDir('nbd-client');
const servers: ChildProcess[] = [];
afterAll(() => {
  for (const s of servers) s.kill('SIGKILL');
  removeTestDir(dir);
});

const MiB = 1024 * 1024;
const qemuImg = (...args: string[]) => execFileSync('qemu-img', args, { stdio: 'pipe' }).toString();
const qemuIo = (file: string, fmt: string, cmd: string) => execFileSync('qemu-io', ['-f', fmt, '-c', cmd, file], { stdio: 'pipe' });

async function serve(file: string, args: string[]): Promise<string> {
  const sock = path.join(dir, `${path.basename(file)}-${servers.length}.sock`);
  const child = spawn('qemu-nbd', ['--socket', sock, '--persistent', '--shared', '4', ...args, file], { stdio: 'ignore' });
  servers.push(child);
  for (let i = 0; i < 200 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
  if (!fs.existsSync(sock)) throw new Error('qemu-nbd did not start');
  return sock;
}

describe('NbdClient against qemu-nbd', () => {
  test('reads data and holes of a qcow2 as guest data, writes, zeroes and flushes', async () => {
    const file = path.join(dir, 'rw.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, '64M');
    qemuIo(file, 'qcow2', 'write -P 0xab 1M 2M');
    const sock = await serve(file, ['-f', 'qcow2', '--discard=unmap']);
    const nbd = await NbdClient.connect(sock, { metaContexts: [BASE_ALLOCATION] });
    try {
      expect(nbd.size).toBe(64 * MiB);
      expect(nbd.readOnly).toBe(false);
      expect(nbd.canWriteZeroes).toBe(true);

      const data = await nbd.read(0, 4 * MiB);
      expect(data.subarray(0, MiB).every((b) => b === 0)).toBe(true);
      expect(data.subarray(MiB, 3 * MiB).every((b) => b === 0xab)).toBe(true);
      expect(data.subarray(3 * MiB).every((b) => b === 0)).toBe(true);

      const map = await nbd.extents(BASE_ALLOCATION);
      expect(map[0]).toEqual({ offset: 0, length: MiB, flags: NBD_STATE_HOLE | NBD_STATE_ZERO });
      expect(map[1]).toEqual({ offset: MiB, length: 2 * MiB, flags: 0 });
      expect(map.reduce((s, e) => s + e.length, 0)).toBe(64 * MiB);

      // Concurrent requests complete by cookie.
      const payload = crypto.randomBytes(3 * MiB);
      await Promise.all([nbd.write(10 * MiB, payload.subarray(0, MiB)), nbd.write(11 * MiB, payload.subarray(MiB))]);
      await nbd.writeZeroes(MiB, 2 * MiB);
      await nbd.flush();
      const [a, b] = await Promise.all([nbd.read(10 * MiB, 3 * MiB), nbd.read(MiB, 2 * MiB)]);
      expect(a.equals(payload)).toBe(true);
      expect(b.every((x) => x === 0)).toBe(true);

      await expect(nbd.read(63 * MiB, 2 * MiB)).rejects.toThrow(NbdError);
    } finally {
      await nbd.close();
    }
    // What qemu-img sees through the file: the written data, and the zeroed range reads as zeros.
    const map = JSON.parse(qemuImg('map', '-U', '--output=json', '-f', 'qcow2', file)) as { start: number; length: number; data: boolean }[];
    expect(map.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual([[10 * MiB, 3 * MiB]]);
  });

  test('dirty-bitmap block status and a read-only export', async () => {
    const file = path.join(dir, 'bitmap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, '32M');
    qemuImg('bitmap', '--add', '-g', '65536', file, 'b1');
    qemuIo(file, 'qcow2', 'write -P 1 4M 64k');
    qemuIo(file, 'qcow2', 'write -P 2 20M 100k');
    const sock = await serve(file, ['-f', 'qcow2', '-r', '-B', 'b1']);
    const nbd = await NbdClient.connect(sock, { metaContexts: [BASE_ALLOCATION, dirtyBitmapContext('b1')] });
    try {
      expect(nbd.readOnly).toBe(true);
      const dirty = (await nbd.extents(dirtyBitmapContext('b1'))).filter((e) => e.flags & NBD_STATE_DIRTY);
      expect(dirty.map((e) => [e.offset, e.length])).toEqual([
        [4 * MiB, 64 * 1024],
        [20 * MiB, 128 * 1024],
      ]);
      await expect(nbd.write(0, Buffer.alloc(512))).rejects.toThrow(/EPERM|read-only|errno/);
    } finally {
      await nbd.close();
    }
    await expect(NbdClient.connect(sock, { metaContexts: [dirtyBitmapContext('nope')] })).rejects.toThrow(/does not offer/);
  });
});
