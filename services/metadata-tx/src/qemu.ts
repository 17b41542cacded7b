import type { FileHandle } from 'node:fs/promises';
import { FIRST_CHILD_FD, imageSpec, runQemuImgWithFds, type ImageFormatName } from '@sdmesh/common';

export interface QemuImgInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFilename: string;
  json: string;
}

/**
 * `qemu-img info` of one opened volume file, with the format its record states and no
 * backing (the spec says so): qemu-img probes nothing and opens no other file.
 */
export async function qemuImgInfo(file: FileHandle, format: ImageFormatName, opts: { signal?: AbortSignal; binary?: string } = {}): Promise<QemuImgInfo> {
  // -U (force share): reading info must work while a VM has the image open.
  const spec = imageSpec([{ fd: FIRST_CHILD_FD, format }]);
  const { stdout: json } = await runQemuImgWithFds(['info', '-U', '--output=json', '-f', format.toLowerCase(), spec], {
    files: [file],
    signal: opts.signal,
    command: opts.binary ? { file: opts.binary, args: [] } : undefined,
  });
  const parsed = JSON.parse(json) as { format?: string; 'virtual-size'?: number; 'actual-size'?: number; 'backing-filename'?: string };
  return {
    format: parsed.format ?? '',
    virtualSize: parsed['virtual-size'] ?? 0,
    actualSize: parsed['actual-size'] ?? 0,
    backingFilename: parsed['backing-filename'] ?? '',
    json,
  };
}
