import { spawn, type ChildProcess } from 'node:child_process';
import type { FileHandle } from 'node:fs/promises';
import { internal, aborted, runQemuImgWithFds, Reason, SdmeshError } from '@sdmesh/common/worker';

/**
 * qemu-img, run so that it dies with the process that started it: `setpriv --pdeathsig KILL`
 * makes the kernel SIGKILL it when its parent (the copy worker) exits for any reason, and it
 * gets its own process group so an abort can kill it and anything it started at once.
 */
export const SETPRIV = 'setpriv';
export const QEMU_IMG = process.env.SDMESH_QEMU_IMG ?? 'qemu-img';

export function qemuImgCommand(args: readonly string[]): { file: string; args: string[] } {
  return { file: SETPRIV, args: ['--pdeathsig', 'KILL', QEMU_IMG, ...args] };
}

/**
 * The copy worker's sanlock registration, inherited by every qemu-img (and qemu-io) it starts,
 * after the fds the image specs name. sanlock frees a holder's leases when its registered
 * connection closes, and the connection closes only when every process holding it is gone: so
 * the leases live until the last of the worker and its writer exits, and a SIGKILLed worker's
 * qemu-img can't write after they are freed (docs/data-mover.md, "No write outlives its lease").
 */
let registration: number[] = [];

export function inheritRegistration(fd: number): void {
  registration = [fd];
}

/** The fds every child that may write gets after its files (empty outside a registered worker). */
export function registrationFds(): readonly number[] {
  return registration;
}

/**
 * Runs a short qemu-img command (info, map, compare) with opened files as its fds 3, 4 ... and
 * returns stdout; errors carry qemu-img's message. Paths of a domain are never arguments: the
 * image specs name /dev/fd/N (see imageSpec in @sdmesh/common).
 */
export function runQemuImg(
  args: string[],
  opts: { signal?: AbortSignal; okCodes?: number[]; files?: ReadonlyArray<FileHandle> } = {},
): Promise<{ stdout: string; code: number }> {
  const cmd = qemuImgCommand([]);
  return runQemuImgWithFds(args, { ...opts, command: { file: cmd.file, args: cmd.args }, inheritFds: registration });
}

export interface ChainImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  encrypted: boolean;
  /** A qcow2 external data file: host offsets then point into it, not into `filename`. */
  dataFile: string;
}

/**
 * `qemu-img info` of an image spec (its backing chain is stated in the spec, so qemu-img
 * opens only the fds it was given; --backing-chain is not used: it re-opens each layer by name).
 */
export async function qemuImgTopInfo(spec: string, format: string, files: ReadonlyArray<FileHandle>, signal?: AbortSignal): Promise<ChainImageInfo> {
  const { stdout } = await runQemuImg(['info', '-U', '--output=json', '-f', format.toLowerCase(), spec], { signal, files });
  const p = JSON.parse(stdout) as {
    filename: string;
    format: string;
    'virtual-size': number;
    encrypted?: boolean;
    'format-specific'?: { data?: { 'data-file'?: string } };
  };
  return {
    filename: p.filename,
    format: p.format,
    virtualSize: p['virtual-size'],
    encrypted: !!p.encrypted,
    dataFile: p['format-specific']?.data?.['data-file'] ?? '',
  };
}

/** One extent of `qemu-img map --output=json`. */
export interface MapExtent {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  compressed?: boolean;
  offset?: number;
}

/**
 * The longest line of a map: one extent object (≈ 200 characters with 20-digit numbers). A
 * longer one is refused, not buffered: the map describes storage, which is hostile input.
 */
export const MAP_MAX_LINE = 1024;

const MAP_NUMBERS = ['start', 'length', 'depth', 'offset'] as const;
const MAP_FLAGS = ['present', 'zero', 'data', 'compressed'] as const;
const MAP_REQUIRED = new Set(['start', 'length', 'depth', 'zero', 'data']);
const MAP_FIELDS = new Set<string>([...MAP_NUMBERS, ...MAP_FLAGS]);

/**
 * Parses `qemu-img map --output=json` as it arrives, one extent a line ("[{…},", "{…},", "{…}]",
 * or "[]" for nothing): memory stays that of one line whatever the number of extents (a
 * fragmented image has millions). Strict: anything else is an error naming the line.
 */
export class QemuMapParser {
  private carry = '';
  private lineNo = 0;
  private state: 'start' | 'extents' | 'end' = 'start';

  /** Feeds a chunk of the output; calls `onExtent` for each extent completed in it. */
  feed(chunk: string, onExtent: (extent: MapExtent) => void): void {
    let from = 0;
    for (let nl = chunk.indexOf('\n'); nl >= 0; nl = chunk.indexOf('\n', from)) {
      const line = this.carry + chunk.slice(from, nl);
      this.carry = '';
      from = nl + 1;
      this.line(line, onExtent);
    }
    this.carry += chunk.slice(from);
    if (this.carry.length > MAP_MAX_LINE) throw this.error(this.lineNo + 1, `a line longer than ${MAP_MAX_LINE} characters`);
  }

  /** The output ended: throws unless it was a whole map (qemu-img ends it with "]" and a newline). */
  end(): void {
    if (this.carry !== '') throw this.error(this.lineNo + 1, 'output ended within a line (truncated)');
    if (this.state !== 'end') throw this.error(this.lineNo, `output ended ${this.lineNo === 0 ? 'empty' : 'before the closing "]"'} (truncated)`);
  }

  private line(raw: string, onExtent: (extent: MapExtent) => void): void {
    const n = ++this.lineNo;
    if (raw.length > MAP_MAX_LINE) throw this.error(n, `a line longer than ${MAP_MAX_LINE} characters`);
    let text = raw;
    if (this.state === 'end') {
      if (text.trim() === '') return;
      throw this.error(n, 'text after the closing "]"');
    }
    if (this.state === 'start') {
      if (!text.startsWith('[')) throw this.error(n, 'the map does not start with "["');
      text = text.slice(1);
      this.state = 'extents';
      if (text === ']') {
        this.state = 'end';
        return;
      }
    }
    const last = text.endsWith('}]');
    if (!last && !text.endsWith('},')) throw this.error(n, 'an extent line must end with "}," or "}]"');
    onExtent(this.extent(text.slice(0, -1), n));
    if (last) this.state = 'end';
  }

  private extent(text: string, n: number): MapExtent {
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      throw this.error(n, 'an extent that is not a JSON object');
    }
    if (typeof value !== 'object' || value === null || Array.isArray(value)) throw this.error(n, 'an extent that is not a JSON object');
    const fields = value as Record<string, unknown>;
    for (const key of Object.keys(fields)) if (!MAP_FIELDS.has(key)) throw this.error(n, `an unknown field "${key}"`);
    for (const key of MAP_REQUIRED) if (!(key in fields)) throw this.error(n, `no "${key}"`);
    for (const key of MAP_NUMBERS) {
      const v = fields[key];
      if (v !== undefined && !(typeof v === 'number' && Number.isSafeInteger(v) && v >= 0))
        throw this.error(n, `"${key}" is not a byte count (${JSON.stringify(v)})`);
    }
    for (const key of MAP_FLAGS) {
      const v = fields[key];
      if (v !== undefined && typeof v !== 'boolean') throw this.error(n, `"${key}" is not true or false`);
    }
    const e = fields as unknown as MapExtent;
    if (e.length === 0) throw this.error(n, 'an empty extent');
    if (!Number.isSafeInteger(e.start + e.length)) throw this.error(n, 'an extent past the largest image size');
    return e;
  }

  private error(n: number, what: string): SdmeshError {
    return internal(`qemu-img map output, line ${n}: ${what}`, Reason.QEMU_IMG_FAILED);
  }
}

/** The extents of a map's text as it arrives (a stream of chunks), one at a time. */
export async function* parseQemuMap(chunks: AsyncIterable<string | Buffer>): AsyncGenerator<MapExtent> {
  const parser = new QemuMapParser();
  // The extents of one chunk (a pipe read: ≤ 64 KiB) at a time.
  let ready: MapExtent[] = [];
  const push = (e: MapExtent) => void ready.push(e);
  for await (const chunk of chunks) {
    parser.feed(typeof chunk === 'string' ? chunk : chunk.toString('latin1'), push);
    const batch = ready;
    ready = [];
    yield* batch;
  }
  parser.end();
}

/**
 * `qemu-img map` of an image spec whose files are `files` (fds 3 ...), its extents as qemu-img
 * prints them: read from its stdout while it runs, never held together (see QemuMapParser). A
 * consumer that stops early stops qemu-img (SIGKILL, waited for).
 */
export async function* qemuImgMap(spec: string, format: string, files: ReadonlyArray<FileHandle>, signal?: AbortSignal): AsyncGenerator<MapExtent> {
  const cancelled = () => SdmeshError.from(signal?.reason ?? aborted('cancelled'));
  if (signal?.aborted) throw cancelled();
  const cmd = qemuImgCommand(['map', '-U', '-f', format.toLowerCase(), '--output=json', spec]);
  const child = spawn(cmd.file, cmd.args, {
    cwd: '/',
    stdio: ['ignore', 'pipe', 'pipe', ...files.map((f) => f.fd), ...registration],
    signal,
    killSignal: 'SIGKILL',
  });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr = (stderr + c).slice(-8000)));
  let startError: Error | undefined;
  const exit = new Promise<number | null>((resolve) => {
    child.once('error', (err) => {
      startError = err;
      resolve(null);
    });
    child.once('close', (code) => resolve(code));
  });
  // Why qemu-img's output is not a whole map, once it has exited: its own failure comes first.
  const failure = (code: number | null): SdmeshError | undefined => {
    if (signal?.aborted) return cancelled();
    if (startError && (startError as NodeJS.ErrnoException).code !== 'ABORT_ERR')
      return internal(`cannot run qemu-img: ${startError.message}`, Reason.QEMU_IMG_FAILED);
    if (code !== null && code !== 0) {
      return internal(`qemu-img map failed: ${stderr.trim().split('\n').slice(-3).join(' ') || `exit ${code}`}`, Reason.QEMU_IMG_FAILED);
    }
    return undefined;
  };
  let finished = false;
  try {
    try {
      yield* parseQemuMap(child.stdout!);
    } catch (err) {
      child.kill('SIGKILL');
      throw failure(await exit) ?? err;
    }
    const code = await exit;
    const failed = failure(code) ?? (code === 0 ? undefined : internal(`qemu-img map ended by a signal`, Reason.QEMU_IMG_FAILED));
    if (failed) throw failed;
    finished = true;
  } finally {
    if (!finished) {
      child.kill('SIGKILL');
      await exit;
    }
  }
}

/** Bytes of allocated, non-zero data in an image as seen through its chain (depth ≤ maxDepth). */
export async function dataBytes(extents: AsyncIterable<MapExtent>, maxDepth = Infinity): Promise<number> {
  let sum = 0;
  for await (const e of extents) if (e.data && !e.zero && e.depth <= maxDepth) sum += e.length;
  return sum;
}

/**
 * Spaces a job's progress reports at least `intervalMs` apart: qemu-img prints every 1 %, and each
 * report is an IPC message, a job update and a message to every watcher of the job: CPU taken from
 * the copy (issue 17). A percent held back is reported by the next one that passes, or by `flush`.
 */
export class ProgressThrottle {
  private lastAt = -Infinity;
  private held: number | undefined;
  constructor(
    private readonly intervalMs: number,
    private readonly now: () => number = () => performance.now(),
  ) {}
  /** The percent to report now, or undefined (held back). */
  offer(percent: number): number | undefined {
    const t = this.now();
    if (t - this.lastAt < this.intervalMs) {
      this.held = percent;
      return undefined;
    }
    this.lastAt = t;
    this.held = undefined;
    return percent;
  }
  /** Holds a percent back without reporting it (reported by the next offer that passes, or flush). */
  hold(percent: number): void {
    this.held = percent;
  }
  /** The percent held back, if any (reported now). */
  flush(): number | undefined {
    const p = this.held;
    this.held = undefined;
    if (p !== undefined) this.lastAt = this.now();
    return p;
  }
}

/** Parses qemu-img's `-p` progress output ("    (12.34/100%)\r"); returns the last percent seen. */
export class ProgressParser {
  private carry = '';
  /** Feeds a chunk of stdout; returns the latest percent in it, or undefined. */
  feed(chunk: string): number | undefined {
    const text = this.carry + chunk;
    let last: number | undefined;
    const re = /\((\d{1,3}(?:\.\d+)?)\/100%\)/g;
    let m: RegExpExecArray | null;
    let consumed = 0;
    while ((m = re.exec(text))) {
      last = Math.min(100, Number(m[1]));
      consumed = re.lastIndex;
    }
    // Keep an unfinished tail (a progress mark split across chunks), bounded.
    this.carry = text.slice(consumed).slice(-32);
    return last;
  }
}

export interface ConvertSpec {
  source: string;
  sourceFormat: 'RAW' | 'QCOW2';
  destination: string;
  destinationFormat: 'RAW' | 'QCOW2';
  /**
   * Keep the destination's backing file: copy only what the source's top layer holds. With -n
   * qemu-img opens nothing by this name (the destination spec states its backing); it only
   * marks the target as having one.
   */
  backing?: { file: string; format: 'RAW' | 'QCOW2' };
  /** The destination must end fully allocated (a preallocated volume): no sparse detection. */
  preallocated: boolean;
  rateLimitBytesPerSecond: number;
}

/**
 * Arguments of the copy. `-n`: write into the destination file metadata-tx created (keeps its
 * format options, backing link and preallocation); with -n qemu-img does not assume the target
 * reads as zeros, so zero areas are written as zeroes (holes punched / zero clusters: the copy
 * stays sparse and overwrites whatever an earlier, interrupted attempt left). `-U`: read a
 * source that a VM or another reader holds open. `-W` (out-of-order writes) only for raw
 * targets: on qcow2 it would scatter clusters. `-t none`: the destination is written O_DIRECT (as
 * vdsm does; its spec says cache.direct too), so no write is left in this host's page cache.
 */
export function convertArgs(spec: ConvertSpec): string[] {
  const args = ['convert', '-p', '-U', '-n', '-t', 'none', '-f', spec.sourceFormat.toLowerCase(), '-O', spec.destinationFormat.toLowerCase(), '-m', '16'];
  if (spec.destinationFormat === 'RAW') args.push('-W');
  if (spec.preallocated) args.push('-S', '0');
  if (spec.backing) args.push('-B', spec.backing.file, '-F', spec.backing.format.toLowerCase());
  if (spec.rateLimitBytesPerSecond > 0) args.push('-r', String(spec.rateLimitBytesPerSecond));
  args.push(spec.source, spec.destination);
  return args;
}

export interface RunningConvert {
  child: ChildProcess;
  done: Promise<void>;
  /** SIGKILLs qemu-img's whole process group; `done` then rejects with ABORTED. */
  kill(reason: string): void;
}

/** Starts `qemu-img convert -p` (own process group, dies with us; `files` are its fds 3 ...) and reports percent. */
export function startConvert(spec: ConvertSpec, onPercent: (percent: number) => void, files: ReadonlyArray<FileHandle> = []): RunningConvert {
  return startQemuImgWithProgress(convertArgs(spec), onPercent, files);
}

/** Starts a long qemu-img command given `-p` (convert, commit, rebase) the same way: own process group, dies with us, percent reported. */
export function startQemuImgWithProgress(args: string[], onPercent: (percent: number) => void, files: ReadonlyArray<FileHandle> = []): RunningConvert {
  const cmd = qemuImgCommand(args);
  const child = spawn(cmd.file, cmd.args, { cwd: '/', detached: true, stdio: ['ignore', 'pipe', 'pipe', ...files.map((f) => f.fd), ...registration] });
  const parser = new ProgressParser();
  let stderr = '';
  let killedFor: string | undefined;
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    const p = parser.feed(chunk);
    if (p !== undefined) onPercent(p);
  });
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => reject(internal(`cannot start qemu-img: ${err.message}`, Reason.QEMU_IMG_FAILED)));
    child.on('close', (code, signal) => {
      if (killedFor !== undefined) return reject(aborted(killedFor, Reason.ABORTED));
      if (code === 0) return resolve();
      const detail = stderr.trim().split('\n').slice(-3).join(' ') || `exit ${code ?? signal}`;
      reject(internal(`qemu-img ${args[0]} failed: ${detail}`, Reason.QEMU_IMG_FAILED));
    });
  });
  return {
    child,
    done,
    kill(reason: string) {
      killedFor = reason;
      if (child.pid && child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(-child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    },
  };
}
