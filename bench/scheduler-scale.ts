/**
 * A scheduler replica at scale next to one on an (almost) empty KV, in one run: two scheduler
 * processes on one nats-server, each with its own KV buckets (--kv-prefix). One holds 10 000
 * ended operations (Move Disk, 6 steps each) on 1 000 disks of one domain (10 per disk), the
 * other 100 (one page). Both are idle; then, in alternating rounds:
 *
 * - idle CPU of each process (utime + stime from /proc over the same window);
 * - ListOperations, first page of 100, no filter; with a filter matching nothing (the whole index is scanned);
 * - GetOperation of a random existing operation (more calls: its p99 is a tail of a ~1 ms call);
 * - the same key read straight from KV by this process (no scheduler): tells a tail of NATS from
 *   one of the replica;
 * - and once, a full re-read of the large bucket: what the takeover scan did every beat before.
 *
 * `npm run bench -- scheduler-scale [operations=10000] [disks=1000] [idle seconds=30] [calls per case=200] [GetOperation calls per case=3000]`
 *
 * Disks themselves live on the storage (the domain's metadata), not in KV: what grows in KV
 * with the disks is their operations, which is what is put there.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { createClient, openKv, pb } from '@sdmesh/common';
import { LocalMesh, startService, type RunningService } from '@sdmesh/localmesh';
import { NatsKvStore } from '@sdmesh/scheduler/dist/kv-store';
import { OperationStore } from '@sdmesh/scheduler/dist/operation-store';
import { endedMoveRecord, printColumns, runBench, summarize, type LatencySummary } from './lib';

/** CPU seconds (user + system) a process has used, from /proc/<pid>/stat. */
function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (100/s)
}

async function main(): Promise<void> {
  const nOps = Number(process.argv[2] ?? 10_000);
  const nDisks = Number(process.argv[3] ?? 1000);
  const idleSeconds = Number(process.argv[4] ?? 30);
  const calls = Number(process.argv[5] ?? 200);
  const getCalls = Number(process.argv[6] ?? Math.max(calls, 3000));
  const rounds = 10;
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-scale-'));
  const mesh = new LocalMesh({ dir, hosts: 1, scheduler: false, perHostServices: [], logLevel: 'warn' });
  await mesh.start();
  const nc = await connect(mesh.nats.connectOptions('scheduler'));
  const schedulers: RunningService[] = [];
  try {
    const domainId = randomUUID();
    const disks = Array.from({ length: nDisks }, () => randomUUID());
    const seed = async (prefix: string, n: number): Promise<string[]> => {
      const store = new OperationStore(new NatsKvStore(await openKv(nc, `${prefix}_operations`)));
      const ids: string[] = [];
      for (let i = 0; i < n; i += 200) {
        const batch = Array.from({ length: Math.min(200, n - i) }, (_, j) =>
          endedMoveRecord(i + j, domainId, { diskId: disks[(i + j) % nDisks]!, owner: 'a-replica-long-gone' }),
        );
        await Promise.all(batch.map((r) => store.create(r)));
        ids.push(...batch.map((r) => r.id));
      }
      return ids;
    };
    const t0 = Date.now();
    const cases = [
      { label: 'baseline: 100 operations', prefix: 'small', ids: await seed('small', 100) },
      { label: `${nOps} ended operations, ${nDisks} disks`, prefix: 'large', ids: await seed('large', nOps) },
    ];
    console.log(`KV seeded in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    for (const c of cases) {
      schedulers.push(
        await startService('scheduler', {
          host: `scheduler-${c.prefix}`,
          env: mesh.schedulerEnv({ SDMESH_LOG_LEVEL: 'warn', SDMESH_KV_PREFIX: c.prefix, SDMESH_HOSTS: '[]' }),
          logFile: path.join(mesh.logDir, `scheduler-${c.prefix}.log`),
        }),
      );
    }
    const clients = schedulers.map((s) => createClient(pb.OperationServiceDefinition, s.grpcAddress, mesh.credentials()));
    // Both indexes loaded (a first page answers once the start-up read is done), then let start-up settle.
    for (const c of clients) await c.listOperations({ pageSize: 1, filter: '', pageToken: '' }, { timeoutMs: 120_000 });
    await new Promise((r) => setTimeout(r, 5000));

    console.log(
      `\nscheduler replicas at scale, one run (${os.cpus().length} cores, load average ${os
        .loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')})\n`,
    );
    // Idle CPU: both processes over the same window.
    const before = schedulers.map((s) => cpuSeconds(s.process.pid));
    const idleStart = Date.now();
    await new Promise((r) => setTimeout(r, idleSeconds * 1000));
    const wall = (Date.now() - idleStart) / 1000;
    const idle = schedulers.map((s, i) => (cpuSeconds(s.process.pid) - before[i]!) / wall);

    type Kind = 'list' | 'filtered' | 'get' | 'kvGet' | 'kvStatus';
    const times = cases.map(() => ({ list: [] as number[], filtered: [] as number[], get: [] as number[], kvGet: [] as number[], kvStatus: [] as number[] }));
    const spent = cases.map(() => ({ list: 0, filtered: 0, get: 0, kvGet: 0, kvStatus: 0 }));
    const perRound = Math.max(1, Math.round(calls / rounds));
    const getsPerRound = Math.max(1, Math.round(getCalls / rounds));
    const stores = await Promise.all(cases.map(async (c) => new OperationStore(new NatsKvStore(await openKv(nc, `${c.prefix}_operations`)))));
    const timed = async (i: number, k: Kind, fn: () => Promise<unknown>) => {
      const start = process.hrtime.bigint();
      const n = k === 'get' || k === 'kvGet' ? getsPerRound : perRound;
      for (let j = 0; j < n; j++) {
        const t = process.hrtime.bigint();
        await fn();
        times[i]![k].push(Number(process.hrtime.bigint() - t) / 1e6);
      }
      spent[i]![k] += Number(process.hrtime.bigint() - start) / 1e9;
    };
    for (let r = 0; r < rounds; r++) {
      for (const i of r % 2 ? [1, 0] : [0, 1]) {
        const api = clients[i]!;
        const ids = cases[i]!.ids;
        await timed(i, 'list', () => api.listOperations({ pageSize: 100, filter: '', pageToken: '' }));
        await timed(i, 'filtered', () => api.listOperations({ pageSize: 100, filter: 'status=RUNNING', pageToken: '' }));
        await timed(i, 'get', () => api.getOperation({ name: `operations/${ids[Math.floor(Math.random() * ids.length)]!}` }));
        await timed(i, 'kvGet', () => stores[i]!.get(ids[Math.floor(Math.random() * ids.length)]!));
        // What each ListOperations asks NATS first (read-your-writes: the bucket's last revision, a stream info request).
        await timed(i, 'kvStatus', () => stores[i]!.kv.lastRevision());
      }
    }
    const s = (i: number, k: Kind, name: string) => summarize(name, times[i]![k], spent[i]![k]);
    const rows: Array<[string, LatencySummary, LatencySummary]> = [
      ['ListOperations, page of 100', s(0, 'list', ''), s(1, 'list', '')],
      ['ListOperations status=RUNNING (no match)', s(0, 'filtered', ''), s(1, 'filtered', '')],
      ['GetOperation', s(0, 'get', ''), s(1, 'get', '')],
      ['the same KV get from this process (no scheduler)', s(0, 'kvGet', ''), s(1, 'kvGet', '')],
      ["the bucket's last revision from this process (each listing's first request)", s(0, 'kvStatus', ''), s(1, 'kvStatus', '')],
    ];
    const ms = (v: number) => v.toFixed(2);
    printColumns(
      ['case', `${cases[0]!.label}: p50 / p99 ms`, `${cases[1]!.label}: p50 / p99 ms`, 'ratio p50 / p99'],
      [
        [
          'idle CPU of the replica (% of one core)',
          `${(idle[0]! * 100).toFixed(2)} %`,
          `${(idle[1]! * 100).toFixed(2)} %`,
          `${(idle[1]! / idle[0]!).toFixed(2)}x`,
        ],
        ...rows.map(([name, a, b]) => [
          name,
          `${ms(a.p50)} / ${ms(a.p99)}`,
          `${ms(b.p50)} / ${ms(b.p99)}`,
          `${(b.p50 / a.p50).toFixed(2)}x / ${(b.p99 / a.p99).toFixed(2)}x`,
        ]),
      ],
    );
    // What the takeover scan did every beat before it used the operation index: a full re-read of the bucket.
    const largeStore = stores[1]!;
    const reread = Date.now();
    const rereadCount = (await largeStore.list()).length;
    console.log(`\none full re-read of the ${rereadCount} operations (the takeover scan's work every beat before the index): ${Date.now() - reread} ms`);
    console.log(
      `idle window ${wall.toFixed(0)} s; ${calls} ListOperations and ${getCalls} GetOperation / KV get calls per case in ${rounds} alternating rounds; load average now ${os
        .loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')}`,
    );
    for (const c of clients) c.close();
  } finally {
    for (const s of schedulers) await s.process.stop();
    await nc.close();
    await mesh.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBench(main);
