import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TransferEndpoint } from '../../packages/sdmctl/src/transfer/endpoint';
import { probeFormat } from '../../packages/sdmctl/src/transfer/local-image';
import { download } from '../../packages/sdmctl/src/transfer/transfers';

describe('sdmctl probes a local image without trusting it', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmctl-probe-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = (name: string, ...args: string[]) => {
    const file = path.join(dir, name);
    execFileSync('qemu-img', ['create', '-q', ...args, file, '1M']);
    return file;
  };

  it('finds raw and a self-contained qcow2, and refuses a qcow2 that would read another file', async () => {
    expect(await probeFormat(img('a.raw', '-f', 'raw'))).toBe('raw');
    const base = img('base.qcow2', '-f', 'qcow2');
    expect(await probeFormat(base)).toBe('qcow2');
    await expect(probeFormat(img('top.qcow2', '-f', 'qcow2', '-b', base, '-F', 'qcow2'))).rejects.toThrow(/reads another file .*base\.qcow2/);
  });
});

describe('sdmctl download into a local file', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmctl-download-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  const MiB = 1024 * 1024;
  /** A transfer endpoint whose disk has 1 MiB of data at offset 1 MiB; reading it fails as `read` says. */
  const endpoint = (read: () => Promise<Buffer>) =>
    ({
      options: async () => ({ size: 4 * MiB }),
      zeroExtents: async () => [
        { start: 0, length: MiB, zero: true },
        { start: MiB, length: MiB, zero: false },
        { start: 2 * MiB, length: 2 * MiB, zero: true },
      ],
      read,
    }) as unknown as TransferEndpoint;

  it('writes FILE.partial and renames it when complete', async () => {
    const file = path.join(dir, 'whole.raw');
    const result = await download(
      endpoint(async () => Buffer.alloc(MiB, 0x5a)),
      file,
      'raw',
    );
    expect([result.dataBytes, result.skippedBytes]).toEqual([MiB, 3 * MiB]);
    expect(fs.existsSync(`${file}.partial`)).toBe(false);
    const data = fs.readFileSync(file);
    expect([data.length, data[MiB], data[2 * MiB - 1], data[0]]).toEqual([4 * MiB, 0x5a, 0x5a, 0]);
  });

  it('a failed or interrupted download leaves neither the file nor its .partial', async () => {
    const file = path.join(dir, 'failed.qcow2');
    await expect(
      download(
        endpoint(() => Promise.reject(new Error('the disk went away'))),
        file,
        'qcow2',
        { retries: 0 },
      ),
    ).rejects.toThrow('the disk went away');
    const interrupted = new AbortController();
    const slow = endpoint(() => {
      interrupted.abort();
      return Promise.reject(new Error('connection reset'));
    });
    await expect(download(slow, file, 'qcow2', { signal: interrupted.signal })).rejects.toThrow();
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('failed'))).toEqual([]);
  });
});
