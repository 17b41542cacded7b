import { spawn } from 'node:child_process';
import type { FileHandle } from 'node:fs/promises';
import { aborted, failedPrecondition, internal, SdmeshError } from '../errors';
import { Reason } from '../reasons';

/**
 * qemu-img never resolves a path of a domain by itself: sdmesh opens every file it gives
 * qemu-img (confined, see confined.ts) and passes the descriptors as the child's fds 3, 4 ...,
 * named `/dev/fd/N` inside a `json:` image spec that states the format of every layer and
 * its backing explicitly. So no format is probed from guest-written data, and no backing or
 * data-file name written into an image header can make qemu-img open another file.
 */

export type ImageFormatName = 'RAW' | 'QCOW2';

/** One layer of an image chain: the child's fd number and the format its record states. */
export interface ImageLayer {
  fd: number;
  format: ImageFormatName;
  /**
   * qemu opens the layer `cache.direct` (O_DIRECT). Set on the layer that is written, so every
   * write reaches the storage before the writer is gone and none waits in this host's page cache
   * for writeback after the writer's lease was freed (docs/data-mover.md, "No write outlives its
   * lease"); and on a copy's source layers, so no stale cached page of a volume another host
   * wrote is read (qemu-img -T none).
   */
  direct?: boolean;
  /**
   * qemu takes no image lock on the layer (file `locking: off`). Only for the backing layers of a
   * copy's destination that keeps its backing: qemu-img convert -B writes just the source's own
   * layer, whole clusters, and never reads them, while the parent may be filled at the same time
   * by its own job (a chain copied in parallel) whose write lock would otherwise conflict.
   */
  unlocked?: boolean;
}

/** Child fds start at 3 (after stdin, stdout, stderr). */
export const FIRST_CHILD_FD = 3;

function layerSpec(layers: readonly ImageLayer[], i: number): Record<string, unknown> {
  const layer = layers[i]!;
  const file: Record<string, unknown> = { driver: 'file', filename: `/dev/fd/${layer.fd}` };
  if (layer.unlocked) file.locking = 'off';
  const spec: Record<string, unknown> = { driver: layer.format.toLowerCase(), file };
  // qemu opens /dev/fd/N anew (Linux reopens the inode behind the descriptor) with the flags of
  // the node's cache mode: set here, per node, so it holds for every tool (resize, bitmap and
  // qemu-io have no -t option) and only for the layer that is written.
  if (layer.direct) spec.cache = { direct: true };
  if (layer.format === 'QCOW2') spec.backing = i + 1 < layers.length ? layerSpec(layers, i + 1) : null;
  return spec;
}

/** The block node tree of a chain, top layer first (what `imageSpec` serializes; QMP blockdev-add takes it as is). */
export function imageNodeSpec(layers: readonly ImageLayer[]): Record<string, unknown> {
  if (layers.length === 0) throw new Error('imageNodeSpec: no layers');
  return layerSpec(layers, 0);
}

/** `json:` spec of a chain, top layer first: every layer's format and backing stated. */
export function imageSpec(layers: readonly ImageLayer[]): string {
  if (layers.length === 0) throw new Error('imageSpec: no layers');
  return 'json:' + JSON.stringify(layerSpec(layers, 0));
}

export interface RunQemuImgOptions {
  /** Open files the child gets as fds 3, 4 ... in this order. */
  files?: ReadonlyArray<FileHandle | number>;
  /** Descriptors the child inherits after `files`, named in no spec (a writer's sanlock registration). */
  inheritFds?: readonly number[];
  signal?: AbortSignal;
  /** Exit codes that are answers, not failures (compare: 1 = different). */
  okCodes?: number[];
  /** Program and leading arguments (default: qemu-img); e.g. setpriv --pdeathsig KILL qemu-img. */
  command?: { file: string; args: string[] };
  cwd?: string;
}

/** Runs a short qemu-img command with the given fds; failures are INTERNAL QEMU_IMG_FAILED with qemu-img's message. */
export function runQemuImgWithFds(args: string[], opts: RunQemuImgOptions = {}): Promise<{ stdout: string; code: number }> {
  const command = opts.command ?? { file: process.env.SDMESH_QEMU_IMG ?? 'qemu-img', args: [] };
  const fds = [...(opts.files ?? []).map((f) => (typeof f === 'number' ? f : f.fd)), ...(opts.inheritFds ?? [])];
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted) return reject(SdmeshError.from(opts.signal.reason ?? aborted('cancelled')));
    const child = spawn(command.file, [...command.args, ...args], {
      cwd: opts.cwd ?? '/',
      stdio: ['ignore', 'pipe', 'pipe', ...fds],
      signal: opts.signal,
      killSignal: 'SIGKILL',
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (c: string) => {
      if (stdout.length < 64 * 1024 * 1024) stdout += c;
    });
    child.stderr!.setEncoding('utf8').on('data', (c: string) => {
      stderr = (stderr + c).slice(-8000);
    });
    child.on('error', (err) => {
      if (opts.signal?.aborted) return reject(SdmeshError.from(opts.signal.reason ?? aborted('cancelled')));
      reject(internal(`cannot run qemu-img: ${err.message}`, Reason.QEMU_IMG_FAILED));
    });
    child.on('close', (code) => {
      if (opts.signal?.aborted) return reject(SdmeshError.from(opts.signal.reason ?? aborted('cancelled')));
      if (code === 0 || (code !== null && opts.okCodes?.includes(code))) return resolve({ stdout, code: code ?? 0 });
      const detail = stderr.trim().split('\n').slice(-3).join(' ') || `exit ${code}`;
      reject(internal(`qemu-img ${args[0]} failed: ${detail}`, Reason.QEMU_IMG_FAILED));
    });
  });
}

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** Incompatible feature bit 2: the guest data lives in an external file named in the header. */
const QCOW2_EXTERNAL_DATA_FILE = 1n << 2n;

/** Whether a file starts with the qcow2 magic (reads 4 bytes; no other parsing). */
export async function hasQcow2Magic(handle: FileHandle): Promise<boolean> {
  const buf = Buffer.alloc(4);
  const { bytesRead } = await handle.read(buf, 0, 4, 0);
  return bytesRead === 4 && buf.readUInt32BE(0) === QCOW2_MAGIC;
}

/**
 * Checks a qcow2 volume's header before qemu-img opens it: it must be qcow2 (version 2 or 3),
 * not encrypted and without an external data file (qemu would open the file the header
 * names). A backing name in the header is harmless: every spec states the backing itself.
 */
export async function checkQcow2Header(
  handle: { read(buf: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }> },
  what: string,
): Promise<void> {
  const header = Buffer.alloc(104);
  const { bytesRead } = await handle.read(header, 0, header.length, 0);
  if (bytesRead < 72 || header.readUInt32BE(0) !== QCOW2_MAGIC)
    throw failedPrecondition(`${what} is not a qcow2 image although its record says QCOW2`, Reason.FORMAT_MISMATCH);
  const version = header.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw failedPrecondition(`${what} is qcow2 version ${version}: not supported`, Reason.UNSUPPORTED_IMAGE);
  if (header.readUInt32BE(32) !== 0) throw failedPrecondition(`${what} is an encrypted qcow2 image: refused`, Reason.IMAGE_ENCRYPTED);
  if (version === 3 && bytesRead >= 80 && (header.readBigUInt64BE(72) & QCOW2_EXTERNAL_DATA_FILE) !== 0n) {
    throw failedPrecondition(`${what} keeps its data in an external data file named in its header: refused`, Reason.IMAGE_HAS_DATA_FILE);
  }
}
