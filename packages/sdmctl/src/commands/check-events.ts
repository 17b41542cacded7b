import fs from 'node:fs';
import { eventFilter, natsConnectionOptions, pb, SdmeshError, subscribeEvents, type GarbageItem } from '@sdmesh/common';
import { connect as natsConnect, type NatsConnection } from '@nats-io/transport-node';
import { checkDomain, type ActiveTargets, type CheckReport } from '../check';
import type { Command, Ctx } from '../context';
import { CliError, EXIT, describeGrpcError, usageError } from '../exit';
import { formatEvent, EVENT_KINDS } from '../events';
import { json, table, time } from '../output';
import { str } from './common';

/** Resource names targeted by operations that have not ended, from the scheduler. */
function activeTargetsFrom(ctx: Ctx): ActiveTargets | undefined {
  if (!ctx.connection.address) return undefined;
  return async () => {
    try {
      const targets = new Set<string>();
      for (const status of ['PENDING', 'RUNNING', 'ABORTING']) {
        let pageToken = '';
        do {
          const res = await ctx.api().ops.listOperations({ filter: `status=${status}`, pageSize: 1000, pageToken }, ctx.call({ timeoutMs: 10_000 }));
          for (const op of res.operations) op.targetResources.forEach((t) => targets.add(t));
          pageToken = res.nextPageToken;
        } while (pageToken);
      }
      return { targets };
    } catch (err) {
      if (err instanceof CliError) return { unavailable: err.message };
      return { unavailable: `scheduler at ${ctx.connection.address} did not answer (${describeGrpcError(SdmeshError.from(err), ctx.connection.address)})` };
    }
  };
}

function garbageDetail(g: GarbageItem): string {
  if (g.tx) return `transaction ${g.txid} of host ${g.tx.hostId} pid ${g.tx.pid}, started ${time(new Date(g.tx.startMs))}`;
  if (g.txid) return `transaction ${g.txid}`;
  if (g.deletedMs) return `deleted ${time(new Date(g.deletedMs))}`;
  return g.kind === 'orphan-volume-data' ? 'data file without a record' : '';
}

export function renderCheckReport(r: CheckReport): string {
  let out = r.domainId
    ? `storage domain ${r.domainName} (${r.domainId}) at ${r.domainPath}\n${r.images} disk(s), ${r.volumes} volume(s), ${r.illegalVolumes} ILLEGAL\n`
    : `${r.domainPath}\n`;
  const findings = [...r.violations, ...r.warnings];
  if (findings.length)
    out +=
      '\n' +
      table(
        ['SEVERITY', 'CHECK', 'WHERE', 'PROBLEM'],
        findings.map((f) => [f.severity.toUpperCase(), f.check, f.where, f.message + (f.reason ? ` [${f.reason}]` : '')]),
      );
  if (r.domainId && r.illegalVolumes > 0)
    out += `\nrunning operations: ${r.runningOperations.checked ? r.runningOperations.detail : `not checked: ${r.runningOperations.detail}`}\n`;
  if (r.garbage.length)
    out +=
      `\ngarbage (the GC removes it):\n` +
      table(
        ['KIND', 'PATH', 'DETAIL'],
        r.garbage.map((g) => [g.kind, g.relativePath, garbageDetail(g)]),
      );
  else if (r.domainId) out += '\nno garbage\n';
  out += r.ok
    ? `\nOK: no violations${r.warnings.length ? `, ${r.warnings.length} warning(s)` : ''}\n`
    : `\nFAILED: ${r.violations.length} violation(s)${r.warnings.length ? `, ${r.warnings.length} warning(s)` : ''}\n`;
  return out;
}

export const checkCommand: Command = {
  path: ['check'],
  summary: "Verify a storage domain's on-disk invariants, reading the storage directly (no server needed).",
  details: [
    'Checks: domain and volume records read back with valid checksums; every volume has its data file',
    'and a lease slot inside the lease area (named after the volume when sanlock formatted it); no two',
    'volumes share a lease slot; every parent exists; no ILLEGAL volume without a running operation.',
    'Garbage (interrupted transactions, deleted disks) is listed; it is not a violation.',
    "ILLEGAL volumes are checked against the scheduler's running operations when --address or",
    'SDMESH_ADDRESS is set and it answers; otherwise they are reported as warnings, saying why.',
    'Exit code: 0 no violations (warnings allowed), 1 violations found, 2 usage error.',
  ].join('\n'),
  args: [{ name: 'DOMAIN_PATH', description: 'Directory of the storage domain (the one holding dom_md/ and images/)' }],
  examples: [
    'sdmctl check /mnt/shared/gold',
    'sdmctl check /mnt/shared/gold --address 127.0.0.1:7000   # ILLEGAL volumes judged against running operations',
    'sdmctl check /mnt/shared/gold -o json | jq .violations',
  ],
  async run(ctx, p) {
    const report = await checkDomain(p.args[0]!, { activeTargets: activeTargetsFrom(ctx) });
    ctx.out.write(ctx.output === 'json' ? json(report) : renderCheckReport(report));
    return report.ok ? EXIT.OK : EXIT.FAILED;
  },
};

export const eventsCommand: Command = {
  path: ['events'],
  summary: 'Tail the sdmesh events on NATS, one readable line each (JSON lines with -o json), until Ctrl-C.',
  details: 'Service heartbeats are hidden unless --heartbeats or --kind service is given. Events are notifications; the storage is the source of truth.',
  flags: [
    { name: 'nats-url', type: 'string', env: 'SDMESH_NATS_URL', value: 'URL', description: 'NATS server (required), e.g. nats://127.0.0.1:4222' },
    {
      name: 'nats-user',
      type: 'string',
      env: 'SDMESH_NATS_USER',
      value: 'USER',
      description: 'NATS user (a reader, e.g. sdmctl), with --nats-password-file; TLS is verified with --tls-ca',
    },
    { name: 'nats-password-file', type: 'string', env: 'SDMESH_NATS_PASSWORD_FILE', value: 'FILE', description: 'File holding the password of --nats-user' },
    { name: 'host', type: 'string', value: 'HOST', description: 'Only events published by this host' },
    { name: 'kind', type: 'enum', choices: EVENT_KINDS, description: 'Only events of this kind' },
    { name: 'domain', type: 'string', value: 'DOMAIN_ID', description: 'Only events about this storage domain (its id)' },
    { name: 'heartbeats', type: 'bool', default: false, description: 'Include service heartbeat events' },
    { name: 'count', type: 'int', min: 1, value: 'N', description: 'Exit after N events' },
  ],
  examples: [
    'sdmctl events --nats-url nats://127.0.0.1:4222',
    'sdmctl events --kind operation',
    'sdmctl events --kind volume --domain 3f0c...',
    'sdmctl events -o json --count 10',
  ],
  async run(ctx, p) {
    const url = str(p, 'nats-url');
    if (!url) throw usageError('no NATS server: pass --nats-url URL or set SDMESH_NATS_URL');
    const domain = str(p, 'domain');
    if (domain && !/^[A-Za-z0-9_-]+$/.test(domain)) throw usageError(`--domain "${domain}" is not a domain id`);
    const kind = str(p, 'kind');
    const host = str(p, 'host');
    if (host && !/^[A-Za-z0-9._-]+$/.test(host)) throw usageError(`--host "${host}" is not a host name`);
    const user = str(p, 'nats-user');
    const passwordFile = str(p, 'nats-password-file');
    if (!!user !== !!passwordFile) throw usageError('--nats-user and --nats-password-file go together (SDMESH_NATS_USER, SDMESH_NATS_PASSWORD_FILE)');
    if (passwordFile && !fs.existsSync(passwordFile)) throw usageError(`--nats-password-file ${passwordFile}: no such file`);
    const heartbeats = p.flags.heartbeats === true || kind === 'service';
    const limit = (p.flags.count as number | undefined) ?? Infinity;
    let nc: NatsConnection;
    try {
      nc = await natsConnect({ ...natsConnectionOptions(url, { user, passwordFile, caFile: ctx.connection.tlsCa }), name: 'sdmctl-events', timeout: 5000 });
    } catch (err) {
      throw new CliError(`cannot reach NATS at ${url}: ${(err as Error).message}`, EXIT.SERVER);
    }
    let seen = 0;
    const filter = eventFilter(kind || '*', domain || '*', host || '*');
    const done = new Promise<void>((resolve) => {
      ctx.signal.addEventListener('abort', () => resolve(), { once: true });
      subscribeEvents(
        nc,
        (event) => {
          if (seen >= limit) return;
          if (!heartbeats && event.payload?.$case === 'service' && event.payload.service.kind === pb.ServiceEvent_Kind.KIND_HEARTBEAT) return;
          seen++;
          ctx.out.write(ctx.output === 'json' ? JSON.stringify(pb.Event.toJSON(event)) + '\n' : formatEvent(event) + '\n');
          if (seen >= limit) resolve();
        },
        filter,
      );
      void nc.closed().then(() => resolve());
    });
    await nc.flush().catch(() => undefined);
    ctx.err.write(`listening on ${url} for ${filter} (Ctrl-C to stop)\n`);
    await done;
    await nc.close().catch(() => undefined);
    return EXIT.OK;
  },
};
