import { pb } from '@sdmesh/common';
import type { Parsed } from '../args';
import type { Command } from '../context';
import { usageError } from '../exit';
import { follow, INTERRUPTED, ProgressView, reportEnd, watchUntilDone } from '../follow';
import { json } from '../output';
import { hostDetail, hostsTable, isTerminal, opDetail, opsTable, statusName } from '../render';
import { REQUEST_ID_FLAG, resolveDomain, str, submit, UUID_RE, WAIT_FLAG } from './common';

export const hostCommands: Command[] = [
  {
    path: ['hosts', 'list'],
    summary: 'List the hosts: health, host ids, lockspace liveness, jobs and copy throughput.',
    examples: ['sdmctl hosts list', 'sdmctl hosts list -o json | jq ".[] | {name, healthy}"'],
    async run(ctx) {
      const { hosts } = await ctx.api().hosts.listHosts({}, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(hosts.map((h) => pb.Host.toJSON(h))) : hosts.length ? hostsTable(hosts) : 'no hosts known\n');
      return 0;
    },
  },
  {
    path: ['hosts', 'get'],
    summary: "Show one host: its services' addresses and its state in every domain.",
    args: [{ name: 'HOST', description: 'Host name' }],
    examples: ['sdmctl hosts get host1'],
    async run(ctx, p) {
      const h = await ctx.api().hosts.getHost({ host: p.args[0]! }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(pb.Host.toJSON(h)) : hostDetail(h));
      return 0;
    },
  },
  {
    path: ['hosts', 'maintenance'],
    summary: 'Put a host in maintenance: no new step goes there, its running steps finish, then it leaves every lockspace.',
    args: [{ name: 'HOST', description: 'Host name' }],
    flags: [WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl hosts maintenance host2 --wait'],
    async run(ctx, p) {
      return submit(ctx, p, (requestId) => ctx.api().hosts.startHostMaintenance({ requestId, host: p.args[0]! }, ctx.call()));
    },
  },
  {
    path: ['hosts', 'activate'],
    summary: "Bring a host back from maintenance: it joins the active domains' lockspaces and takes steps again.",
    args: [{ name: 'HOST', description: 'Host name' }],
    flags: [WAIT_FLAG, REQUEST_ID_FLAG],
    examples: ['sdmctl hosts activate host2 --wait'],
    async run(ctx, p) {
      return submit(ctx, p, (requestId) => ctx.api().hosts.activateHost({ requestId, host: p.args[0]! }, ctx.call()));
    },
  },
];

const OP_ARG = { name: 'OPERATION', description: 'Operation name (operations/<uuid>) or its uuid' };

function opName(p: Parsed): string {
  const raw = p.args[0]!;
  const id = raw.replace(/^operations\//, '');
  if (!UUID_RE.test(id)) throw usageError(`"${raw}" is not an operation (operations/<uuid> or <uuid>; sdmctl ops list shows them)`);
  return `operations/${id}`;
}

const STATUSES = ['pending', 'running', 'done', 'aborting', 'aborted', 'failed'];
/** Every operation type, from the contract (create_storage_domain, move_disk, ...). */
const TYPES = Object.keys(pb.OperationType)
  .filter((k) => k.startsWith('OPERATION_TYPE_') && k !== 'OPERATION_TYPE_UNSPECIFIED')
  .map((k) => k.slice('OPERATION_TYPE_'.length).toLowerCase());

export const opCommands: Command[] = [
  {
    path: ['ops', 'list'],
    summary: 'List operations (oldest first), optionally filtered.',
    flags: [
      { name: 'status', type: 'enum', choices: STATUSES, description: 'Only operations in this status' },
      { name: 'type', type: 'enum', choices: TYPES, description: 'Only operations of this type' },
      { name: 'disk', type: 'string', value: 'DISK_ID', description: 'Only operations on this disk (any domain)' },
      { name: 'domain', short: 'd', type: 'string', value: 'DOMAIN', description: 'Only operations on this storage domain or its disks (id or name)' },
      { name: 'active', type: 'bool', default: false, description: 'Only operations that have not ended (pending, running, aborting)' },
      { name: 'filter', type: 'string', value: 'EXPR', description: 'Raw API filter, e.g. "status=RUNNING AND type=MOVE_DISK AND disk=<id>"' },
    ],
    examples: [
      'sdmctl ops list',
      'sdmctl ops list --status running',
      'sdmctl ops list --type move_disk -o json',
      'sdmctl ops list --disk 5d1e... --type copy_disk',
      'sdmctl ops list --domain gold --active',
    ],
    async run(ctx, p) {
      const disk = str(p, 'disk');
      if (disk && !UUID_RE.test(disk)) throw usageError(`--disk "${disk}" is not a disk id (a lowercase UUID; sdmctl disks list shows them)`);
      const terms = [
        str(p, 'filter'),
        str(p, 'status') && `status=${str(p, 'status').toUpperCase()}`,
        str(p, 'type') && `type=${str(p, 'type').toUpperCase()}`,
        disk && `disk=${disk}`,
        str(p, 'domain') && `domain=${await resolveDomain(ctx, str(p, 'domain'))}`,
      ].filter((t) => t);
      const out: pb.Operation[] = [];
      let pageToken = '';
      do {
        const res = await ctx.api().ops.listOperations({ filter: terms.join(' AND '), pageSize: 1000, pageToken }, ctx.call());
        out.push(...res.operations);
        pageToken = res.nextPageToken;
      } while (pageToken);
      const shown = p.flags.active ? out.filter((o) => !isTerminal(o.status)) : out;
      ctx.out.write(ctx.output === 'json' ? json(shown.map((o) => pb.Operation.toJSON(o))) : shown.length ? opsTable(shown) : 'no operations\n');
      return 0;
    },
  },
  {
    path: ['ops', 'get'],
    summary: 'Show an operation: status, progress, error, and every step with the host that ran it.',
    args: [OP_ARG],
    examples: ['sdmctl ops get 5d1e...', 'sdmctl ops get operations/5d1e... -o json'],
    async run(ctx, p) {
      const op = await ctx.api().ops.getOperation({ name: opName(p) }, ctx.call());
      ctx.out.write(ctx.output === 'json' ? json(pb.Operation.toJSON(op)) : opDetail(op));
      return 0;
    },
  },
  {
    path: ['ops', 'cancel'],
    summary: 'Ask an operation to stop (it goes ABORTING, then ABORTED once its running step has stopped).',
    args: [OP_ARG],
    flags: [WAIT_FLAG],
    examples: ['sdmctl ops cancel 5d1e...', 'sdmctl ops cancel 5d1e... --wait'],
    async run(ctx, p) {
      const op = await ctx.api().ops.cancelOperation({ name: opName(p) }, ctx.call());
      // ABORTED is what cancel asked for; DONE means it finished before it could stop.
      if (p.flags.wait) return follow(ctx, op, [pb.OperationStatus.OPERATION_STATUS_ABORTED, pb.OperationStatus.OPERATION_STATUS_DONE]);
      ctx.out.write(ctx.output === 'json' ? json(pb.Operation.toJSON(op)) : `${op.name}: ${statusName(op.status)}\n`);
      return 0;
    },
  },
  {
    path: ['ops', 'wait'],
    summary: 'Wait until an operation ends; exit 0 if DONE, 1 if FAILED or ABORTED or still running at --timeout.',
    args: [OP_ARG],
    flags: [{ name: 'timeout', type: 'int', min: 0, default: 0, value: 'SECONDS', description: 'Give up after this long (0 = no limit)' }],
    examples: ['sdmctl ops wait 5d1e...', 'sdmctl ops wait 5d1e... --timeout 60 && echo moved'],
    async run(ctx, p) {
      const name = opName(p);
      const timeout = (p.flags.timeout as number) || 0;
      const until = timeout ? Date.now() + timeout * 1000 : Infinity;
      let op: pb.Operation;
      // WaitOperation in slices, so a long wait survives the per-call deadline.
      for (;;) {
        const slice = Math.max(1, Math.min(25, Math.ceil((until - Date.now()) / 1000)));
        op = await ctx.api().ops.waitOperation({ name, timeoutSeconds: slice }, ctx.call({ timeoutMs: (slice + 10) * 1000 }));
        if (isTerminal(op.status) || Date.now() >= until || ctx.signal.aborted) break;
      }
      if (!isTerminal(op.status)) {
        if (ctx.signal.aborted) return reportEnd(ctx, op, name);
        if (ctx.output === 'json') ctx.out.write(json(pb.Operation.toJSON(op)));
        ctx.err.write(`sdmctl: ${name} is still ${statusName(op.status)} after ${timeout} s\n`);
        return 1;
      }
      return reportEnd(ctx, op, name);
    },
  },
  {
    path: ['ops', 'watch'],
    summary: 'Follow an operation until it ends: a live progress bar on a terminal, one line per change otherwise (JSON lines with -o json).',
    args: [OP_ARG],
    examples: ['sdmctl ops watch 5d1e...', 'sdmctl ops watch 5d1e... -o json | jq -c "{status, currentStep, progress}"'],
    async run(ctx, p) {
      const name = opName(p);
      if (ctx.tty && ctx.output === 'table') {
        const view = new ProgressView((t) => ctx.out.write(t));
        let last: pb.Operation | undefined;
        const timer = setInterval(() => last && view.update(last), 1000);
        try {
          last = await watchUntilDone(ctx, name, (o) => ((last = o), view.update(o)));
        } finally {
          clearInterval(timer);
          view.finish();
        }
        return reportEnd(ctx, last, name);
      }
      const last = await watchUntilDone(ctx, name, (o) => {
        if (ctx.output === 'json') ctx.out.write(JSON.stringify(pb.Operation.toJSON(o)) + '\n');
        else {
          const pr = o.progress && o.progress.bytesTotal > 0 ? ` ${o.progress.percent.toFixed(0)}% ${o.progress.mbps.toFixed(1)} MB/s` : '';
          const host = o.steps.find((s) => s.name === o.currentStep)?.host;
          ctx.out.write(`${new Date().toISOString()} ${statusName(o.status)} ${o.currentStep || '-'}${host ? ` on ${host}` : ''}${pr}\n`);
        }
      });
      if (!last || !isTerminal(last.status)) {
        ctx.err.write(`sdmctl: stopped watching ${name}\n`);
        return INTERRUPTED;
      }
      if (last.status === pb.OperationStatus.OPERATION_STATUS_DONE) return 0;
      ctx.err.write(`sdmctl: ${name} ${statusName(last.status)}${last.error ? `: ${last.error.message}` : ''}\n`);
      return 1;
    },
  },
];
