import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { probeFormat } from '../../packages/sdmctl/src/transfer/local-image';

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
