import { pb } from '@sdmesh/common';
import type { Command } from '../context';
import { bool, DOMAIN_FLAG, enumFlag, resolveDomain, REQUEST_ID_FLAG, str, submit, WAIT_FLAG, WAIT_FOR_LOCKS_FLAG } from './common';
import { DISK_ARG, diskId } from './disks';

/** `sdmctl disks template` and `sdmctl disks clone`: templates and the disks made from them (docs/templates.md). */
export const templateCommands: Command[] = [
  {
    path: ['disks', 'template'],
    summary: 'Make a one-volume disk a template: read-only from then on, the source of clones.',
    args: [DISK_ARG],
    flags: [DOMAIN_FLAG, WAIT_FOR_LOCKS_FLAG, WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl disks template --domain gold 0b6f5a3e-... --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.markDiskTemplate({ requestId, storageDomainId: domain, diskId: id, waitForLocks: bool(p, 'wait-for-locks') }, ctx.call()),
      );
    },
  },
  {
    path: ['disks', 'clone'],
    summary: 'A new disk from a template: thin (a qcow2 overlay on the template, in its domain) or full (an independent copy).',
    args: [{ name: 'TEMPLATE', description: 'Template disk id (a UUID)' }],
    flags: [
      DOMAIN_FLAG,
      { name: 'mode', type: 'enum', choices: ['thin', 'full'], default: 'thin', description: 'thin: shares the template data; full: copies it' },
      { name: 'to', type: 'string', value: 'DOMAIN', description: "Target storage domain of a full clone (default: the template's)" },
      { name: 'description', type: 'string', value: 'TEXT', description: 'Description of the new disk' },
      WAIT_FOR_LOCKS_FLAG,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: ['sdmctl disks clone --domain gold 0b6f5a3e-... --wait', 'sdmctl disks clone -d gold 0b6f5a3e-... --mode full --to silver --wait'],
    async run(ctx, p) {
      const id = diskId(p);
      const domain = await resolveDomain(ctx, str(p, 'domain'));
      const target = str(p, 'to') ? await resolveDomain(ctx, str(p, 'to'), '--to') : '';
      return submit(ctx, p, (requestId) =>
        ctx.api().disks.cloneDisk(
          {
            requestId,
            storageDomainId: domain,
            templateDiskId: id,
            mode: enumFlag(str(p, 'mode'), 'CLONE_MODE_', pb.cloneModeFromJSON, '--mode'),
            targetStorageDomainId: target,
            description: str(p, 'description'),
            waitForLocks: bool(p, 'wait-for-locks'),
          },
          ctx.call(),
        ),
      );
    },
  },
];
