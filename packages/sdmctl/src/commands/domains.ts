import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command } from '../context';
import { json } from '../output';
import { domainDetail, domainsTable } from '../render';
import { parseSize, usageErrorIfMissing } from './helpers';
import { listAllDomains, REQUEST_ID_FLAG, resolveDomain, str, submit, WAIT_FLAG } from './common';

/** The free-space thresholds of a new or attached domain (0 = the scheduler's defaults). */
const THRESHOLD_FLAGS = [
  { name: 'warning-free-percent', type: 'int', value: 'PERCENT', description: 'Warn below this much free space (default 10)' },
  { name: 'critical-free', type: 'string', value: 'SIZE', description: 'Critical below this much free space, e.g. 5G (default 5 GiB)' },
] as const;

const thresholdsOf = (p: Parsed) => ({
  warningFreePercent: (p.flags['warning-free-percent'] as number | undefined) ?? 0,
  criticalFreeBytes: str(p, 'critical-free') ? parseSize(str(p, 'critical-free'), '--critical-free') : 0,
});

export const domainCommands: Command[] = [
  {
    path: ['domains', 'list'],
    summary: 'List the storage domains the scheduler knows, with status, space and counts.',
    examples: ['sdmctl domains list', 'sdmctl domains list -o json | jq -r ".[].id"'],
    async run(ctx) {
      const all = await listAllDomains(ctx);
      ctx.out.write(
        ctx.output === 'json'
          ? json(all.map((d) => pb.StorageDomain.toJSON(d)))
          : all.length
            ? domainsTable(all)
            : 'no storage domains (create one: sdmctl domains create --name NAME --path /shared/dir)\n',
      );
      return 0;
    },
  },
  {
    path: ['domains', 'get'],
    summary: 'Show one storage domain.',
    args: [{ name: 'DOMAIN', description: 'Storage domain id or name' }],
    examples: ['sdmctl domains get gold', 'sdmctl domains get 3f0c...-... -o json'],
    async run(ctx, p) {
      const id = await resolveDomain(ctx, p.args[0]!, 'DOMAIN');
      const d = await ctx.api().domains.getStorageDomain({ storageDomainId: id }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(pb.StorageDomain.toJSON(d)) : domainDetail(d));
      return 0;
    },
  },
  {
    path: ['domains', 'create'],
    summary: 'Format a directory on shared storage as a new storage domain and connect every host to it.',
    details: 'The directory must be absent or empty and visible at the same path on every host.',
    flags: [
      { name: 'name', type: 'string', value: 'NAME', description: 'Name of the domain (required)' },
      { name: 'path', type: 'string', value: 'DIR', description: 'Absolute path of the domain directory (required)' },
      ...THRESHOLD_FLAGS,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: [
      'sdmctl domains create --name gold --path /mnt/shared/gold --wait',
      'sdmctl domains create --name silver --path /mnt/shared/silver --request-id create-silver',
    ],
    async run(ctx, p) {
      usageErrorIfMissing(p, ['name', 'path']);
      const thresholds = thresholdsOf(p);
      return submit(ctx, p, (requestId) =>
        ctx.api().domains.createStorageDomain({ requestId, name: str(p, 'name'), path: str(p, 'path'), ...thresholds }, ctx.call()),
      );
    },
  },
  {
    path: ['domains', 'remove'],
    summary: 'Remove an empty storage domain: hosts leave its lockspace and the scheduler forgets it (the files stay).',
    details: 'With --keep-data a domain that still has disks is detached: they stay on storage, and `sdmctl domains attach` adopts them again.',
    args: [{ name: 'DOMAIN', description: 'Storage domain id or name' }],
    flags: [
      { name: 'keep-data', type: 'bool', default: false, description: 'Detach a domain that still has disks (they stay on storage)' },
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: ['sdmctl domains remove silver --wait', 'sdmctl domains remove gold --keep-data --wait'],
    async run(ctx, p) {
      const id = await resolveDomain(ctx, p.args[0]!, 'DOMAIN');
      const keepData = p.flags['keep-data'] === true;
      return submit(ctx, p, (requestId) => ctx.api().domains.removeStorageDomain({ requestId, storageDomainId: id, keepData }, ctx.call()));
    },
  },
  {
    path: ['domains', 'attach'],
    summary: 'Adopt an existing storage domain directory (disaster recovery, or one detached with --keep-data): its id, its disks, hosts join its lockspace.',
    details: 'The directory must be a formatted domain beneath a storage root, visible at the same path on every host.',
    flags: [
      { name: 'path', type: 'string', value: 'DIR', description: 'Absolute path of the domain directory (required)' },
      ...THRESHOLD_FLAGS,
      WAIT_FLAG,
      REQUEST_ID_FLAG,
    ],
    examples: ['sdmctl domains attach --path /mnt/shared/gold --wait'],
    async run(ctx, p) {
      usageErrorIfMissing(p, ['path']);
      const thresholds = thresholdsOf(p);
      return submit(ctx, p, (requestId) => ctx.api().domains.attachStorageDomain({ requestId, path: str(p, 'path'), ...thresholds }, ctx.call()));
    },
  },
  {
    path: ['domains', 'deactivate'],
    summary: 'Put a storage domain in maintenance: waits for its running operations, refuses new ones, every host leaves its lockspace.',
    args: [{ name: 'DOMAIN', description: 'Storage domain id or name' }],
    flags: [WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl domains deactivate silver --wait'],
    async run(ctx, p) {
      const id = await resolveDomain(ctx, p.args[0]!, 'DOMAIN');
      return submit(ctx, p, (requestId) => ctx.api().domains.deactivateStorageDomain({ requestId, storageDomainId: id }, ctx.call()));
    },
  },
  {
    path: ['domains', 'activate'],
    summary: 'Bring a storage domain back from maintenance: hosts join its lockspace, operations are accepted again.',
    args: [{ name: 'DOMAIN', description: 'Storage domain id or name' }],
    flags: [WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl domains activate silver --wait'],
    async run(ctx, p) {
      const id = await resolveDomain(ctx, p.args[0]!, 'DOMAIN');
      return submit(ctx, p, (requestId) => ctx.api().domains.activateStorageDomain({ requestId, storageDomainId: id }, ctx.call()));
    },
  },
];
