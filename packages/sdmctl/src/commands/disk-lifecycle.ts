import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command } from '../context';
import { usageError } from '../exit';
import { json, table } from '../output';
import { bool, DOMAIN_FLAG, REQUEST_ID_FLAG, resolveDomain, str, submit, UUID_RE, WAIT_FLAG, WAIT_FOR_LOCKS_FLAG } from './common';
import { parseSize, usageErrorIfMissing } from './helpers';

/** sdmctl disks extend|sparsify|amend and disks bitmaps list|add|remove|clear (issue 15). */

const DISK_ARG = { name: 'DISK', description: 'Disk id (a UUID)' };
const BITMAP_ARG = { name: 'BITMAP', description: 'Bitmap name: 1..128 characters of letters, digits and . _ : -' };
const CHANGE_FLAGS = [WAIT_FOR_LOCKS_FLAG, WAIT_FLAG, REQUEST_ID_FLAG];

function diskId(p: Parsed): string {
  const id = p.args[0]!;
  if (!UUID_RE.test(id)) throw usageError(`DISK "${id}" is not a disk id (a lowercase UUID; sdmctl disks list shows them)`);
  return id;
}

const target = async (ctx: Parameters<Command['run']>[0], p: Parsed) => ({
  storageDomainId: await resolveDomain(ctx, str(p, 'domain')),
  diskId: diskId(p),
  waitForLocks: bool(p, 'wait-for-locks'),
});

export const diskLifecycleCommands: Command[] = [
  {
    path: ['disks', 'extend'],
    summary: 'Grow a disk: its leaf volume gets the new capacity (old content stays, the new tail reads as zeros).',
    args: [DISK_ARG],
    flags: [
      DOMAIN_FLAG,
      { name: 'size', type: 'string', value: 'SIZE', description: 'New capacity, e.g. 20G, or bytes; at least the current one (required)' },
      ...CHANGE_FLAGS,
    ],
    examples: ['sdmctl disks extend --domain gold 0b6f5a3e-... --size 20G --wait'],
    async run(ctx, p) {
      usageErrorIfMissing(p, ['size']);
      const capacityBytes = parseSize(str(p, 'size'));
      const t = await target(ctx, p);
      return submit(ctx, p, (requestId) => ctx.api().disks.extendDisk({ requestId, ...t, capacityBytes }, ctx.call()));
    },
  },
  {
    path: ['disks', 'sparsify'],
    summary: 'Give back the space of zeroed data in every sparse volume of a disk (the content does not change).',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, ...CHANGE_FLAGS],
    examples: ['sdmctl disks sparsify --domain gold 0b6f5a3e-... --wait'],
    async run(ctx, p) {
      const t = await target(ctx, p);
      return submit(ctx, p, (requestId) => ctx.api().disks.sparsifyDisk({ requestId, ...t }, ctx.call()));
    },
  },
  {
    path: ['disks', 'amend'],
    summary: 'Upgrade the qcow2 compat level of every qcow2 volume of a disk (0.10 → 1.1).',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, { name: 'compat', type: 'string', value: 'LEVEL', default: '1.1', description: 'qcow2 compat level to reach' }, ...CHANGE_FLAGS],
    examples: ['sdmctl disks amend --domain gold 0b6f5a3e-... --compat 1.1 --wait'],
    async run(ctx, p) {
      const t = await target(ctx, p);
      return submit(ctx, p, (requestId) => ctx.api().disks.amendDisk({ requestId, ...t, qcow2Compat: str(p, 'compat') }, ctx.call()));
    },
  },
  {
    path: ['disks', 'bitmaps', 'list'],
    summary: "List the dirty bitmaps of each volume of a disk (base first), with the volume's qcow2 compat level.",
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG],
    examples: ['sdmctl disks bitmaps list --domain gold 0b6f5a3e-...', 'sdmctl disks bitmaps list -d gold 0b6f5a3e-... -o json'],
    async run(ctx, p) {
      const res = await ctx.api().disks.listDiskBitmaps({ storageDomainId: await resolveDomain(ctx, str(p, 'domain')), diskId: diskId(p) }, ctx.call());
      if (ctx.output === 'json') {
        ctx.out.write(json(pb.ListDiskBitmapsResponse.toJSON(res)));
        return 0;
      }
      const rows = res.volumes.flatMap((v) => {
        const format = v.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? `qcow2 ${v.qcow2Compat}` : 'raw';
        if (v.bitmaps.length === 0) return [[v.volumeId, format, '-', '', '']];
        return v.bitmaps.map((b) => [v.volumeId, format, b.name, b.granularityBytes, b.inUse ? 'in-use' : b.enabled ? 'enabled' : 'disabled']);
      });
      ctx.out.write(table(['VOLUME', 'FORMAT', 'BITMAP', 'GRANULARITY', 'STATE'], rows));
      return 0;
    },
  },
  {
    path: ['disks', 'bitmaps', 'add'],
    summary: "Add a dirty bitmap to a disk's leaf (qcow2); snapshots carry it to their new leaf.",
    args: [DISK_ARG, BITMAP_ARG],
    flags: [
      DOMAIN_FLAG,
      { name: 'granularity', type: 'string', value: 'SIZE', description: 'Bytes per bit, a power of two (default: the cluster size)' },
      ...CHANGE_FLAGS,
    ],
    examples: ['sdmctl disks bitmaps add --domain gold 0b6f5a3e-... backup-1 --wait'],
    async run(ctx, p) {
      const t = await target(ctx, p);
      const granularityBytes = str(p, 'granularity') ? parseSize(str(p, 'granularity')) : 0;
      return submit(ctx, p, (requestId) => ctx.api().disks.addDiskBitmap({ requestId, ...t, bitmap: p.args[1]!, granularityBytes }, ctx.call()));
    },
  },
  {
    path: ['disks', 'bitmaps', 'remove'],
    summary: 'Remove a dirty bitmap from every volume of a disk that has it.',
    args: [DISK_ARG, BITMAP_ARG],
    flags: [DOMAIN_FLAG, ...CHANGE_FLAGS],
    examples: ['sdmctl disks bitmaps remove --domain gold 0b6f5a3e-... backup-1 --wait'],
    async run(ctx, p) {
      const t = await target(ctx, p);
      return submit(ctx, p, (requestId) => ctx.api().disks.removeDiskBitmap({ requestId, ...t, bitmap: p.args[1]! }, ctx.call()));
    },
  },
  {
    path: ['disks', 'bitmaps', 'clear'],
    summary: 'Remove every dirty bitmap from every volume of a disk.',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, ...CHANGE_FLAGS],
    examples: ['sdmctl disks bitmaps clear --domain gold 0b6f5a3e-... --wait'],
    async run(ctx, p) {
      const t = await target(ctx, p);
      return submit(ctx, p, (requestId) => ctx.api().disks.clearDiskBitmaps({ requestId, ...t }, ctx.call()));
    },
  },
];
