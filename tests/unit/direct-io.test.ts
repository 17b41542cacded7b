import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { imageSpec, reopenDirect, SdmeshError } from '@sdmesh/common';

/**
 * No write outlives its lease (docs/data-mover.md): written layers are opened O_DIRECT by qemu
 * (cache.direct in their spec) and the writer gets only an O_DIRECT descriptor of them; a file
 * system that refuses O_DIRECT refuses the write (no buffered fallback).
 */
const O_DIRECT = 0o40000;
const fdFlags = (fd: number) => parseInt(/^flags:\s+([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);

describe('O_DIRECT for written volume files', () => {
  it('marks only the written layer cache.direct in an image spec', () => {
    const spec = JSON.parse(
      imageSpec([
        { fd: 3, format: 'QCOW2', direct: true },
        { fd: 4, format: 'RAW' },
      ]).slice('json:'.length),
    ) as { cache?: { direct: boolean }; backing: { cache?: unknown } };
    expect(spec.cache).toEqual({ direct: true });
    expect(spec.backing.cache).toBeUndefined();
  });

  it('reopens a file O_DIRECT through its own descriptor (same inode), and refuses where the file system does not allow it', async () => {
    const dir = await fsp.mkdtemp(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-direct-'));
    try {
      const buffered = await fsp.open(path.join(dir, 'volume'), 'w+');
      const direct = await reopenDirect(buffered, 'volume v');
      expect([fdFlags(buffered.fd) & O_DIRECT, fdFlags(direct.fd) & O_DIRECT]).toEqual([0, O_DIRECT]);
      expect((await direct.stat()).ino).toBe((await buffered.stat()).ino);
      await Promise.all([direct.close(), buffered.close()]);
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
    // procfs refuses O_DIRECT (as ramfs, and tmpfs before Linux 6.6, do).
    const proc = await fsp.open('/proc/self/comm', 'r+');
    try {
      const err = await reopenDirect(proc, 'volume w').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SdmeshError);
      expect({ reason: (err as SdmeshError).reason, message: (err as SdmeshError).message }).toEqual({
        reason: 'DIRECT_IO_UNSUPPORTED',
        message: expect.stringMatching(/^volume w: its file system refuses O_DIRECT/) as unknown,
      });
    } finally {
      await proc.close();
    }
  });
});
