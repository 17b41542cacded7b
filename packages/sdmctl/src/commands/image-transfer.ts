import fs from 'node:fs';
import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command, Ctx } from '../context';
import { failed, usageError } from '../exit';
import { follow } from '../follow';
import { bytes, duration, json } from '../output';
import { TransferEndpoint } from '../transfer/endpoint';
import { LocalImage, probeFormat, type LocalFormat } from '../transfer/local-image';
import { backup, download, upload, type TransferOptions, type TransferProgress, type TransferResult } from '../transfer/transfers';
import { waitTransferReady } from './transfers';
import { bool, DOMAIN_FLAG, REQUEST_ID_FLAG, requestIdOf, resolveDomain, str, UUID_RE, WAIT_FOR_LOCKS_FLAG } from './common';

/**
 * sdmctl disks upload|download|backup (issue 19): an image transfer operation (StartImageTransfer),
 * the data moved over the transfer's HTTPS URL — sparse-aware, resumable per segment — then
 * FinalizeImageTransfer (or CancelImageTransfer when the data could not be moved).
 */

const DISK_ARG = { name: 'DISK', description: 'Disk id (a UUID)' };
const FORMAT_FLAG = {
  name: 'format',
  type: 'enum' as const,
  choices: ['raw', 'qcow2'],
  value: 'FORMAT',
  description: 'Format of the local file (upload: probed when not given; download: default raw)',
};
const TIMEOUT_FLAG = {
  name: 'inactivity-timeout',
  type: 'int' as const,
  min: 1,
  default: 60,
  value: 'SECONDS',
  description: 'The transfer is rolled back when no request reaches it for this long',
};

function diskId(p: Parsed): string {
  const id = p.args[0]!;
  if (!UUID_RE.test(id)) throw usageError(`DISK "${id}" is not a disk id (a lowercase UUID; sdmctl disks list shows them)`);
  return id;
}

/** A progress bar on a terminal (stderr stays quiet otherwise). */
function progressBar(ctx: Ctx, what: string): ((p: TransferProgress) => void) | undefined {
  if (!ctx.tty || ctx.output !== 'table') return undefined;
  const started = Date.now();
  let last = 0;
  return ({ done, total }) => {
    const now = Date.now();
    if (now - last < 200 && done < total) return;
    last = now;
    const pct = total > 0 ? Math.min(100, (done / total) * 100) : 100;
    const filled = Math.round(pct / 4);
    const mbps = done / 1e6 / Math.max(0.001, (now - started) / 1000);
    ctx.out.write(
      `\r\x1b[2K  ▸ ${what} [${'█'.repeat(filled)}${'░'.repeat(25 - filled)}] ${pct.toFixed(0).padStart(3)}%  ${bytes(done)} / ${bytes(total)}  ${mbps.toFixed(1)} MB/s`,
    );
  };
}

/** Starts the transfer and waits until its URL accepts requests. */
async function startTransfer(ctx: Ctx, p: Parsed, req: TransferStart): Promise<{ op: pb.Operation; transfer: pb.ImageTransfer }> {
  const op = await ctx.api().transfers.startImageTransfer(
    {
      requestId: requestIdOf(p),
      storageDomainId: await resolveDomain(ctx, str(p, 'domain')),
      diskId: diskId(p),
      inactivityTimeoutSeconds: (p.flags['inactivity-timeout'] as number | undefined) ?? 60,
      waitForLocks: bool(p, 'wait-for-locks'),
      ...req,
    },
    ctx.call(),
  );
  return { op, transfer: await waitTransferReady(ctx, op.name) };
}

type TransferStart = Pick<pb.StartImageTransferRequest, 'direction' | 'format' | 'bitmap' | 'uploadSizeBytes'>;

function endpointOf(ctx: Ctx, t: pb.ImageTransfer): TransferEndpoint {
  const c = ctx.connection;
  return new TransferEndpoint(t.url, {
    host: t.host,
    tls: c.insecure || !c.tlsCa || !c.tlsCert || !c.tlsKey ? undefined : { ca: c.tlsCa, cert: c.tlsCert, key: c.tlsKey },
  });
}

/**
 * Runs the data part of a transfer, then finalizes it; when the data part fails the transfer is
 * cancelled (rolled back) and the error reported.
 */
async function runTransfer(
  ctx: Ctx,
  p: Parsed,
  start: TransferStart,
  what: string,
  move: (endpoint: TransferEndpoint, opts: TransferOptions) => Promise<TransferResult>,
): Promise<number> {
  const transfers = ctx.api().transfers;
  const began = Date.now();
  const { op, transfer } = await startTransfer(ctx, p, start);
  const endpoint = endpointOf(ctx, transfer);
  let result: TransferResult;
  try {
    result = await move(endpoint, { onProgress: progressBar(ctx, what), signal: ctx.signal });
    if (ctx.tty && ctx.output === 'table') ctx.out.write('\r\x1b[2K');
  } catch (err) {
    if (ctx.tty) ctx.out.write('\n');
    await transfers.cancelImageTransfer({ name: op.name }, ctx.call()).catch(() => undefined);
    throw failed(`${what} failed, the transfer was cancelled (${op.name}): ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    endpoint.close();
  }
  const secs = (Date.now() - began) / 1000;
  if (ctx.output === 'table') {
    ctx.out.write(
      `${what}: ${bytes(result.dataBytes)} of data in ${duration(Date.now() - began)} (${(result.dataBytes / 1e6 / secs).toFixed(1)} MB/s), ` +
        `${bytes(result.skippedBytes)} of zeros not sent, ${bytes(result.zeroedBytes)} zeroed${result.retried ? `, ${result.retried} requests retried` : ''}\n`,
    );
  }
  const finalizing = await transfers.finalizeImageTransfer({ name: op.name }, ctx.call());
  const code = await follow(ctx.output === 'json' ? { ...ctx, output: 'table', out: { write: () => undefined } } : ctx, finalizing);
  if (ctx.output === 'json') ctx.out.write(json({ operation: op.name, ...result }));
  return code;
}

const COMMON_FLAGS = [DOMAIN_FLAG, TIMEOUT_FLAG, WAIT_FOR_LOCKS_FLAG, REQUEST_ID_FLAG];

export const imageTransferCommands: Command[] = [
  {
    path: ['disks', 'upload'],
    summary: 'Upload a local raw or qcow2 image into a disk (its guest data; zeros are not sent). The disk is ILLEGAL until the upload is finalized.',
    args: [DISK_ARG, { name: 'FILE', description: 'Local image file (raw or qcow2)' }],
    flags: [...COMMON_FLAGS, FORMAT_FLAG],
    examples: ['sdmctl disks upload --domain gold 0b6f5a3e-... ./fedora.qcow2'],
    async run(ctx, p) {
      const file = p.args[1]!;
      if (!fs.existsSync(file)) throw usageError(`FILE ${file} does not exist`);
      const format = (str(p, 'format') as LocalFormat) || (await probeFormat(file));
      const local = await LocalImage.open(file, format, { write: false });
      const size = local.size;
      await local.close();
      return runTransfer(
        ctx,
        p,
        { direction: pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD, format: pb.TransferFormat.TRANSFER_FORMAT_RAW, bitmap: '', uploadSizeBytes: size },
        'upload',
        (endpoint, opts) => upload(endpoint, file, format, opts),
      );
    },
  },
  {
    path: ['disks', 'download'],
    summary: "Download a disk's guest data into a local file (raw: sparse; qcow2: only the data clusters).",
    args: [DISK_ARG, { name: 'FILE', description: 'Local file to write (replaced)' }],
    flags: [...COMMON_FLAGS, FORMAT_FLAG],
    examples: ['sdmctl disks download --domain gold 0b6f5a3e-... ./disk.raw', 'sdmctl disks download -d gold 0b6f5a3e-... ./disk.qcow2 --format qcow2'],
    async run(ctx, p) {
      const file = p.args[1]!;
      const format = (str(p, 'format') as LocalFormat) || 'raw';
      return runTransfer(
        ctx,
        p,
        { direction: pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD, format: pb.TransferFormat.TRANSFER_FORMAT_RAW, bitmap: '', uploadSizeBytes: 0 },
        'download',
        (endpoint, opts) => download(endpoint, file, format, opts),
      );
    },
  },
  {
    path: ['disks', 'backup'],
    summary:
      'Back a disk up into a qcow2 file: full (every allocated extent), or --incremental with --bitmap B and --backing the previous backup (only the extents B marks dirty; restore = the chain).',
    args: [DISK_ARG, { name: 'OUT', description: 'qcow2 file to write (replaced)' }],
    flags: [
      ...COMMON_FLAGS,
      { name: 'incremental', type: 'bool', default: false, description: 'Only the extents the bitmap marks dirty (needs --bitmap and --backing)' },
      { name: 'bitmap', type: 'string', value: 'BITMAP', description: "A dirty bitmap of the disk's leaf (sdmctl disks bitmaps list)" },
      { name: 'backing', type: 'string', value: 'FILE', description: 'The previous backup (full or incremental): the new file’s backing file' },
    ],
    examples: [
      'sdmctl disks backup -d gold 0b6f5a3e-... full.qcow2',
      'sdmctl disks backup -d gold 0b6f5a3e-... inc1.qcow2 --incremental --bitmap b1 --backing full.qcow2',
    ],
    async run(ctx, p) {
      const out = p.args[1]!;
      const incremental = bool(p, 'incremental');
      const bitmap = str(p, 'bitmap');
      const backing = str(p, 'backing');
      if (incremental && (!bitmap || !backing)) throw usageError('--incremental needs --bitmap and --backing (the previous backup)');
      if (!incremental && backing) throw usageError('--backing is only for --incremental backups');
      if (backing && !fs.existsSync(backing)) throw usageError(`--backing ${backing} does not exist`);
      return runTransfer(
        ctx,
        p,
        {
          direction: pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD,
          format: pb.TransferFormat.TRANSFER_FORMAT_RAW,
          bitmap: incremental ? bitmap : '',
          uploadSizeBytes: 0,
        },
        incremental ? 'incremental backup' : 'backup',
        (endpoint, opts) => backup(endpoint, out, { ...opts, incremental: incremental ? { backing } : undefined }),
      );
    },
  },
];
