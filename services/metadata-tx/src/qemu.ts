import { execFile } from 'node:child_process';
import { internal, SdmeshError } from '@sdmesh/common';

export interface QemuImgInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFilename: string;
  json: string;
}

/** Runs qemu-img; failures become INTERNAL 'QEMU_IMG_FAILED' with qemu-img's own message. */
export function runQemuImg(args: string[], opts: { cwd?: string; signal?: AbortSignal; binary?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(opts.binary ?? 'qemu-img', args, { cwd: opts.cwd, signal: opts.signal, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (!err) return resolve(stdout);
      if (opts.signal?.aborted) return reject(SdmeshError.from(opts.signal.reason));
      const detail = (stderr || err.message).trim().split('\n').slice(-3).join(' ');
      reject(internal(`qemu-img ${args[0]} failed: ${detail}`, 'QEMU_IMG_FAILED'));
    });
  });
}

export async function qemuImgInfo(file: string, opts: { signal?: AbortSignal; binary?: string } = {}): Promise<QemuImgInfo> {
  // -U (force share): reading info must work while a VM has the image open.
  const json = await runQemuImg(['info', '-U', '--output=json', file], opts);
  const parsed = JSON.parse(json) as { format?: string; 'virtual-size'?: number; 'actual-size'?: number; 'backing-filename'?: string };
  return {
    format: parsed.format ?? '',
    virtualSize: parsed['virtual-size'] ?? 0,
    actualSize: parsed['actual-size'] ?? 0,
    backingFilename: parsed['backing-filename'] ?? '',
    json,
  };
}
