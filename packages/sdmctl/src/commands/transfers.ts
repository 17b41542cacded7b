import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command, Ctx } from '../context';
import { failed, usageError } from '../exit';
import { follow } from '../follow';
import { bytes, enumName, json, keyValues, time } from '../output';
import { statusName } from '../render';
import { DOMAIN_FLAG, REQUEST_ID_FLAG, requestIdOf, resolveDomain, str, UUID_RE, WAIT_FLAG, WAIT_FOR_LOCKS_FLAG } from './common';
import { DISK_ARG, diskId } from './disks';

/**
 * `sdmctl transfers start|show|finalize|cancel`: the control plane of image transfers
 * (docs/image-transfer.md). `sdmctl disks upload|download|backup` run a whole transfer; these
 * commands drive one by hand (e.g. for a client of the HTTPS endpoint other than sdmctl).
 */

const TRANSFER_ARG = { name: 'TRANSFER', description: 'The transfer: its operation (operations/<uuid>) or uuid' };

export function transferName(p: Parsed): string {
  const raw = p.args[0]!;
  const id = raw.replace(/^operations\//, '');
  if (!UUID_RE.test(id)) throw usageError(`"${raw}" is not a transfer (operations/<uuid> or <uuid>; sdmctl ops list --type image_transfer shows them)`);
  return `operations/${id}`;
}

const phaseName = (p: pb.TransferPhase) => enumName(pb.transferPhaseToJSON(p), 'TRANSFER_PHASE_');

/**
 * Waits until the transfer's endpoint accepts requests (phase READY) and returns it with its URL
 * (the URL is given only to the user who started it); fails when it ended first.
 */
export async function waitTransferReady(ctx: Ctx, name: string, timeoutMs = 300_000): Promise<pb.ImageTransfer> {
  for (const until = Date.now() + timeoutMs; ;) {
    const t = await ctx.api().transfers.getImageTransfer({ name }, ctx.call());
    if (t.phase === pb.TransferPhase.TRANSFER_PHASE_READY) {
      if (!t.url) throw failed(`${name} is open, but its URL is only given to the user who started it (${t.owner})`);
      return t;
    }
    if (t.phase === pb.TransferPhase.TRANSFER_PHASE_ENDED || t.phase === pb.TransferPhase.TRANSFER_PHASE_FINALIZING) {
      throw failed(`${name} ${statusName(t.status)} before it was ready${t.error ? `: ${t.error.message} [${t.error.reason}]` : ''}`);
    }
    if (Date.now() > until) throw failed(`${name} was not ready after ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

export function transferDetail(t: pb.ImageTransfer): string {
  return keyValues([
    ['Transfer', t.name],
    ['Disk', `${t.diskId} (domain ${t.storageDomainId})`],
    ['Direction', enumName(pb.transferDirectionToJSON(t.direction), 'TRANSFER_DIRECTION_')],
    ['Phase', phaseName(t.phase)],
    ['Status', statusName(t.status)],
    ['Host', t.host],
    ['URL', t.url],
    ['Size', bytes(t.sizeBytes)],
    ['Transferred', bytes(t.bytesTransferred)],
    ['Bitmap', t.bitmap],
    ['Owner', t.owner],
    ['Inactivity timeout', `${t.inactivityTimeoutSeconds} s`],
    ['Expires', time(t.expireTime)],
    ['Error', t.error ? `${t.error.message} [${t.error.reason}]` : ''],
  ]);
}

export const transferCommands: Command[] = [
  {
    path: ['transfers', 'start'],
    summary: 'Open an image transfer of a disk: an upload marks it ILLEGAL until finalized. Prints the transfer (and, with --wait-ready, its URL).',
    args: [DISK_ARG],
    flags: [
      DOMAIN_FLAG,
      { name: 'direction', type: 'enum', choices: ['upload', 'download'], description: 'upload (write the disk) or download (read it)' },
      { name: 'size', type: 'string', value: 'BYTES', description: 'Upload: bytes the image has (default: the disk capacity)' },
      { name: 'bitmap', type: 'string', value: 'NAME', description: 'Download: /extents?context=dirty reports the extents this dirty bitmap marks' },
      { name: 'inactivity-timeout', type: 'string', value: 'SECONDS', description: 'Roll the transfer back after this long without requests (default 60)' },
      { name: 'wait-ready', type: 'bool', default: false, description: 'Wait until the endpoint accepts requests and print its URL' },
      WAIT_FOR_LOCKS_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: [
      'sdmctl transfers start --domain gold 0b6f5a3e-... --direction upload --wait-ready',
      'sdmctl transfers start -d gold 0b6f... --direction download --bitmap nightly',
    ],
    async run(ctx, p) {
      const id = diskId(p);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      const direction = str(p, 'direction');
      if (!direction) throw usageError('--direction upload|download is required');
      const int = (flag: string) => {
        const v = str(p, flag);
        if (v && !/^\d+$/.test(v)) throw usageError(`--${flag} must be a whole number`);
        return v ? Number(v) : 0;
      };
      const op = await ctx.api().transfers.startImageTransfer(
        {
          requestId: requestIdOf(p),
          storageDomainId: domain,
          diskId: id,
          direction: direction === 'upload' ? pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD : pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD,
          format: pb.TransferFormat.TRANSFER_FORMAT_RAW,
          bitmap: str(p, 'bitmap'),
          uploadSizeBytes: int('size'),
          inactivityTimeoutSeconds: int('inactivity-timeout'),
          waitForLocks: p.flags['wait-for-locks'] === true,
        },
        ctx.call(),
      );
      const t =
        p.flags['wait-ready'] === true ? await waitTransferReady(ctx, op.name) : await ctx.api().transfers.getImageTransfer({ name: op.name }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(pb.ImageTransfer.toJSON(t)) : transferDetail(t));
      return 0;
    },
  },
  {
    path: ['transfers', 'show'],
    summary: 'Show an image transfer: phase, host, bytes moved, and its URL to the user who started it.',
    args: [TRANSFER_ARG],
    examples: ['sdmctl transfers show 5d1e...', 'sdmctl transfers show 5d1e... -o json'],
    async run(ctx, p) {
      const t = await ctx.api().transfers.getImageTransfer({ name: transferName(p) }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(pb.ImageTransfer.toJSON(t)) : transferDetail(t));
      return 0;
    },
  },
  {
    path: ['transfers', 'finalize'],
    summary: 'End an image transfer: flush, verify and (upload) make the disk LEGAL. --wait follows it to the end.',
    args: [TRANSFER_ARG],
    flags: [WAIT_FLAG],
    examples: ['sdmctl transfers finalize 5d1e... --wait'],
    async run(ctx, p) {
      const op = await ctx.api().transfers.finalizeImageTransfer({ name: transferName(p) }, ctx.call());
      if (p.flags.wait === true) return follow(ctx, op);
      ctx.out.write(ctx.output === 'json' ? json(pb.Operation.toJSON(op)) : `${op.name}: finalizing\n`);
      return 0;
    },
  },
  {
    path: ['transfers', 'cancel'],
    summary: 'Cancel an image transfer: rolled back (an upload whose URL was out leaves the disk ILLEGAL: upload again or delete it).',
    args: [TRANSFER_ARG],
    flags: [WAIT_FLAG],
    examples: ['sdmctl transfers cancel 5d1e... --wait'],
    async run(ctx, p) {
      const op = await ctx.api().transfers.cancelImageTransfer({ name: transferName(p) }, ctx.call());
      if (p.flags.wait === true) return follow(ctx, op, [pb.OperationStatus.OPERATION_STATUS_ABORTED, pb.OperationStatus.OPERATION_STATUS_DONE]);
      ctx.out.write(ctx.output === 'json' ? json(pb.Operation.toJSON(op)) : `${op.name}: ${statusName(op.status)}\n`);
      return 0;
    },
  },
];
