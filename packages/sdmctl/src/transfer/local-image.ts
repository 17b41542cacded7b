import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { BASE_ALLOCATION, NbdClient } from '@sdmesh/common';

/**
 * A local image file read or written through qemu: a private qemu-nbd on a unix socket and an NBD
 * connection to it. So a qcow2 file is read as the guest data it holds, and its zero and
 * allocation extents come from qemu — the same way the data-mover serves disks.
 */

export type LocalFormat = 'raw' | 'qcow2';
const QEMU_NBD = process.env.SDMESH_QEMU_NBD ?? 'qemu-nbd';
const QEMU_IMG = process.env.SDMESH_QEMU_IMG ?? 'qemu-img';
const run = promisify(execFile);

/**
 * The format qemu-img finds in a local file (raw or qcow2; anything else is refused) when no
 * --format is given. A probed file is untrusted bytes: a qcow2 header naming a backing or an
 * external data file would make qemu read that other file into the upload, so such a file is
 * refused (flatten it, or name its format with --format).
 */
export async function probeFormat(file: string): Promise<LocalFormat> {
  const { stdout } = await run(QEMU_IMG, ['info', '-U', '--output=json', file]);
  const info = JSON.parse(stdout) as { format: string; 'backing-filename'?: string; 'format-specific'?: { data?: { 'data-file'?: string } } };
  if (info.format !== 'raw' && info.format !== 'qcow2') throw new Error(`${file} is a ${info.format} image: only raw and qcow2 are transferred`);
  const other = info['backing-filename'] ?? info['format-specific']?.data?.['data-file'];
  if (other) throw new Error(`${file} is a qcow2 image that reads another file (${other}): flatten it first, or give --format if you trust it`);
  return info.format;
}

/** Creates an empty local image of `size` guest bytes (raw: a sparse file; qcow2 optionally over a backing file). */
export async function createImage(file: string, format: LocalFormat, size: number, backing?: string): Promise<void> {
  fs.rmSync(file, { force: true });
  const args = ['create', '-q', '-f', format];
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  await run(QEMU_IMG, [...args, file, String(size)]);
}

export class LocalImage {
  private constructor(
    readonly nbd: NbdClient,
    private readonly server: ChildProcess,
    private readonly dir: string,
  ) {}

  static async open(file: string, format: LocalFormat, opts: { write: boolean }): Promise<LocalImage> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdmctl-nbd-'));
    const socket = path.join(dir, 'nbd.sock');
    const args = ['--socket', socket, '--format', format, '--shared', '2', opts.write ? '--discard=unmap' : '--read-only', path.resolve(file)];
    const server = spawn(QEMU_NBD, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    server.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr = (stderr + c).slice(-2000)));
    try {
      // qemu-nbd creates the socket file before it listens: connect until it answers.
      for (let i = 0; ; i++) {
        if (server.exitCode !== null || i > 1500) throw new Error(`qemu-nbd could not open ${file}: ${stderr.trim() || 'no socket'}`);
        if (fs.existsSync(socket)) {
          const nbd = await NbdClient.connect(socket, { metaContexts: [BASE_ALLOCATION] }).catch(() => undefined);
          if (nbd) return new LocalImage(nbd, server, dir);
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    } catch (err) {
      server.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get size(): number {
    return this.nbd.size;
  }

  /** Flushes (when written), disconnects and stops qemu-nbd, which then closes the image cleanly. */
  async close(): Promise<void> {
    if (!this.nbd.readOnly) await this.nbd.flush().catch(() => undefined);
    await this.nbd.close().catch(() => undefined);
    if (this.server.exitCode === null) {
      const exited = new Promise((r) => this.server.once('exit', r));
      this.server.kill('SIGTERM');
      await exited;
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
