import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command, Ctx } from '../context';
import { usageError } from '../exit';
import { json } from '../output';
import { attachmentsTable, diskDetail, disksTable } from '../render';
import { bool, DOMAIN_FLAG, enumFlag, listAllDomains, REQUEST_ID_FLAG, resolveDomain, str, submit, UUID_RE, WAIT_FLAG, WAIT_FOR_LOCKS_FLAG } from './common';
import { parseSize, usageErrorIfMissing } from './helpers';

export const DISK_ARG = { name: 'DISK', description: 'Disk id (a UUID)' };
const TO_FLAG = { name: 'to', type: 'string', value: 'DOMAIN', description: 'Target storage domain (id or name; required)' } as const;
const FORMAT_FLAG = { name: 'format', type: 'enum', choices: ['raw', 'qcow2'], description: 'Volume format' } as const;

export function diskId(p: Parsed): string {
  const id = p.args[0]!;
  if (!UUID_RE.test(id)) throw usageError(`DISK "${id}" is not a disk id (a lowercase UUID; sdmctl disks list shows them)`);
  return id;
}

const format = (p: Parsed) => enumFlag(str(p, 'format'), 'VOLUME_FORMAT_', pb.volumeFormatFromJSON, '--format');

async function listDisks(ctx: Ctx, domainId: string): Promise<pb.Disk[]> {
  const out: pb.Disk[] = [];
  let pageToken = '';
  do {
    const res = await ctx.api().disks.listDisks({ storageDomainId: domainId, pageSize: 1000, pageToken }, ctx.call());
    out.push(...res.disks);
    pageToken = res.nextPageToken;
  } while (pageToken);
  return out;
}

export const diskCommands: Command[] = [
  {
    path: ['disks', 'list'],
    summary: 'List the disks of a storage domain (of every domain without --domain).',
    flags: [DOMAIN_FLAG],
    examples: ['sdmctl disks list --domain gold', 'sdmctl disks list', 'sdmctl disks list -d gold -o json'],
    async run(ctx, p) {
      const ids = str(p, 'domain') ? [await resolveDomain(ctx, str(p, 'domain'))] : (await listAllDomains(ctx)).map((d) => d.id);
      const all = (await Promise.all(ids.map((id) => listDisks(ctx, id)))).flat();
      ctx.out.write(ctx.output === 'json' ? json(all.map((d) => pb.Disk.toJSON(d))) : all.length ? disksTable(all) : 'no disks\n');
      return 0;
    },
  },
  {
    path: ['disks', 'get'],
    summary: 'Show one disk and its volume chain (base first), with paths, legality, generations and lease slots.',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG],
    examples: ['sdmctl disks get --domain gold 0b6f5a3e-...', 'sdmctl disks get -d gold 0b6f5a3e-... -o json | jq -r ".volumes[-1].path"'],
    async run(ctx, p) {
      const id = diskId(p);
      const storageDomainId = await resolveDomain(ctx, str(p, 'domain'));
      const d = await ctx.api().disks.getDisk({ storageDomainId, diskId: id }, ctx.call());
      const { attachments } = await ctx.api().attachments.listDiskAttachments({ storageDomainId, diskId: id, host: '' }, ctx.call());
      ctx.out.write(
        ctx.output === 'json'
          ? json({ ...(pb.Disk.toJSON(d) as object), attachments: attachments.map((a) => pb.DiskAttachment.toJSON(a)) })
          : `${diskDetail(d)}\nPublished to (attachments):\n${attachmentsTable(attachments)}`,
      );
      return 0;
    },
  },
  {
    path: ['disks', 'attachments'],
    summary: 'Show which hosts disks are published to (CSI ControllerPublishVolume): of one disk, of a domain, or all.',
    args: [{ ...DISK_ARG, optional: true }],
    flags: [DOMAIN_FLAG, { name: 'host', type: 'string', value: 'HOST', description: 'Only the attachments of this host' }],
    examples: ['sdmctl disks attachments', 'sdmctl disks attachments -d gold 0b6f5a3e-...', 'sdmctl disks attachments --host host2 -o json'],
    async run(ctx, p) {
      const id = p.args[0] ? diskId(p) : '';
      const storageDomainId = str(p, 'domain') || id ? await resolveDomain(ctx, str(p, 'domain')) : ''; // a disk id needs its domain
      const { attachments } = await ctx.api().attachments.listDiskAttachments({ storageDomainId, diskId: id, host: str(p, 'host') }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(attachments.map((a) => pb.DiskAttachment.toJSON(a))) : attachmentsTable(attachments));
      return 0;
    },
  },
  {
    path: ['disks', 'create'],
    summary: 'Create a disk (one volume) in a storage domain.',
    flags: [
      DOMAIN_FLAG,
      { name: 'size', type: 'string', value: 'SIZE', description: 'Capacity, e.g. 10G, 512M, or bytes; a multiple of 512 (required)' },
      { ...FORMAT_FLAG, default: 'raw' },
      { name: 'allocation', type: 'enum', choices: ['sparse', 'preallocated'], default: 'sparse', description: 'Space reservation' },
      { name: 'description', type: 'string', value: 'TEXT', description: 'Free text (≤ 256 bytes)' },
      WAIT_FOR_LOCKS_FLAG,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: [
      'sdmctl disks create --domain gold --size 10G --wait',
      'sdmctl disks create -d gold --size 1G --format qcow2 --description "web server" -o json',
    ],
    async run(ctx, p) {
      usageErrorIfMissing(p, ['size']);
      const capacityBytes = parseSize(str(p, 'size'));
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.createDisk(
          {
            requestId,
            storageDomainId: domain,
            capacityBytes,
            format: format(p),
            allocation: enumFlag(str(p, 'allocation'), 'VOLUME_ALLOCATION_', pb.volumeAllocationFromJSON, '--allocation'),
            description: str(p, 'description'),
            waitForLocks: bool(p, 'wait-for-locks'),
          },
          ctx.call(),
        ),
      );
    },
  },
  {
    path: ['disks', 'delete'],
    summary: 'Delete a disk (its image is renamed to garbage at once; the GC removes the data later).',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, WAIT_FOR_LOCKS_FLAG, WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl disks delete --domain gold 0b6f5a3e-... --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.deleteDisk({ requestId, storageDomainId: domain, diskId: id, waitForLocks: bool(p, 'wait-for-locks') }, ctx.call()),
      );
    },
  },
  {
    path: ['disks', 'snapshot'],
    summary: 'Snapshot a disk: a new qcow2 leaf volume on top of the current one.',
    args: [DISK_ARG],
    flags: [
      DOMAIN_FLAG,
      { name: 'description', type: 'string', value: 'TEXT', description: 'Description of the new volume' },
      WAIT_FOR_LOCKS_FLAG,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: ['sdmctl disks snapshot --domain gold 0b6f5a3e-... --description "before upgrade" --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx
          .api()
          .disks.snapshotDisk(
            { requestId, storageDomainId: domain, diskId: id, description: str(p, 'description'), waitForLocks: bool(p, 'wait-for-locks') },
            ctx.call(),
          ),
      );
    },
  },
  {
    path: ['disks', 'delete-snapshot'],
    summary:
      "Delete a snapshot: one volume leaves the disk's chain, its data merged into its parent (or, for the base, into its child); the leaf's data stays as it is.",
    args: [DISK_ARG, { name: 'VOLUME', description: 'Id of the volume to remove (sdmctl disks get lists the chain)' }],
    flags: [DOMAIN_FLAG, WAIT_FOR_LOCKS_FLAG, WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl disks delete-snapshot --domain gold 0b6f5a3e-... 7c1d2e4f-... --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      const volumeId = p.args[1]!;
      if (!UUID_RE.test(volumeId)) throw usageError(`VOLUME "${volumeId}" is not a volume id (a lowercase UUID; sdmctl disks get shows them)`);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.deleteSnapshot({ requestId, storageDomainId: domain, diskId: id, volumeId, waitForLocks: bool(p, 'wait-for-locks') }, ctx.call()),
      );
    },
  },
  {
    path: ['disks', 'copy'],
    summary: 'Copy a disk to a storage domain (the same or another) as a new disk.',
    args: [DISK_ARG],
    flags: [
      DOMAIN_FLAG,
      TO_FLAG,
      { name: 'collapse', type: 'bool', default: false, description: 'Flatten the chain into one volume (otherwise the chain is kept)' },
      { ...FORMAT_FLAG, description: 'Format of the flattened volume (with --collapse)' },
      WAIT_FOR_LOCKS_FLAG,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: [
      'sdmctl disks copy --domain gold 0b6f5a3e-... --to silver --wait',
      'sdmctl disks copy -d gold 0b6f5a3e-... --to gold --collapse --format raw --wait',
    ],
    async run(ctx, p) {
      const id = diskId(p);
      usageErrorIfMissing(p, ['to']);
      const [domain, target] = [await resolveDomain(ctx, str(p, 'domain')), await resolveDomain(ctx, str(p, 'to'), '--to')];
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.copyDisk(
          {
            requestId,
            storageDomainId: domain,
            diskId: id,
            targetStorageDomainId: target,
            collapse: bool(p, 'collapse'),
            targetFormat: format(p),
            waitForLocks: bool(p, 'wait-for-locks'),
          },
          ctx.call(),
        ),
      );
    },
  },
  {
    path: ['disks', 'move'],
    summary: 'Move a disk to another storage domain: create the target, copy every volume, delete the source.',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, TO_FLAG, WAIT_FOR_LOCKS_FLAG, WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl disks move --domain gold 0b6f5a3e-... --to silver --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      usageErrorIfMissing(p, ['to']);
      const [domain, target] = [await resolveDomain(ctx, str(p, 'domain')), await resolveDomain(ctx, str(p, 'to'), '--to')];
      return submit(ctx, p, (requestId) =>
        ctx
          .api()
          .disks.moveDisk(
            { requestId, storageDomainId: domain, diskId: id, targetStorageDomainId: target, waitForLocks: bool(p, 'wait-for-locks') },
            ctx.call(),
          ),
      );
    },
  },
  {
    path: ['disks', 'import'],
    summary: 'Import a raw or qcow2 file that one host can read as a new disk.',
    flags: [
      DOMAIN_FLAG,
      { name: 'host', type: 'string', value: 'HOST', description: 'Host that can read the file (required)' },
      { name: 'source', type: 'string', value: 'FILE', description: 'Absolute path of the file on that host (required)' },
      FORMAT_FLAG,
      { name: 'description', type: 'string', value: 'TEXT', description: 'Description of the disk' },
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: ['sdmctl disks import --domain gold --host host1 --source /var/tmp/disk.qcow2 --format qcow2 --wait'],
    async run(ctx, p) {
      usageErrorIfMissing(p, ['host', 'source']);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx
          .api()
          .disks.importDisk(
            { requestId, storageDomainId: domain, host: str(p, 'host'), sourcePath: str(p, 'source'), format: format(p), description: str(p, 'description') },
            ctx.call(),
          ),
      );
    },
  },
];
