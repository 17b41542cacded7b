/**
 * Lease acquire+release latency: through the lease-manager's gRPC API (what every sdmesh
 * service pays) next to sanlock itself in the same run — the addon called in-process (the
 * floor: sanlock's own cost) and sanlock's CLI (`sanlock client command -r … -c /bin/true`,
 * which also pays a process start).
 *
 * The in-process baseline runs in a child process (sanlock knows a holder by its pid, and this
 * process registers as the lease-manager's holder), so the two cases can alternate in rounds:
 * on a shared machine both see the same load. The lease-manager case is LeaseHolder.withLease, as
 * services take leases (acquire through the lease-manager, release in sanlock by the holder itself
 * plus a notice); a third case releases through the lease-manager too (how it was done before
 * issue 17's change), and a fourth, two GetLockspace calls on the same socket, is what two gRPC
 * hops cost with no sanlock work at all.
 *
 * Both cases' lease areas are formatted by the lease-manager (FormatLeases), as the product formats
 * them: for MAX_HOST_ID hosts (sanlock num_hosts), which sets how much each paxos acquire reads.
 * The lease-manager runs as deployed: log level info (its audit line per call) and a state
 * directory (its held-lease table, written on every grant and release).
 *
 * `npm run bench -- lease-acquire [cycles per case=200] [rounds=10] [CLI cycles=50, 0: none]`
 */
import { execFileSync, fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance, PerformanceObserver } from 'node:perf_hooks';
import * as sanlock from '@sdmesh/sanlock';
import { createLogger, LeaseHolder, localLeaseManagerClient, MAX_HOST_ID, pb } from '@sdmesh/common';
import { measure, printColumns, printTable, runBench, startLeaseManagerStack, summarize, type LatencySummary } from './lib';

const BASELINE_CHILD = '--in-process-baseline';

/** The child: registers with the daemon, then times `n` acquire+release cycles per request of the parent. */
async function baselineChild(): Promise<void> {
  sanlock.setRunDir(process.env.SANLOCK_RUN_DIR!);
  const client = sanlock.registerProcess();
  await client.inquire();
  const res = [{ name: 'addon', path: process.env.BENCH_LEASES!, offset: 1048576 }];
  process.on('message', (msg: { n: number }) => {
    void (async () => {
      const times: number[] = [];
      for (let i = 0; i < msg.n; i++) {
        const t = process.hrtime.bigint();
        await client.acquire('bench', res);
        await client.release('bench', res);
        times.push(Number(process.hrtime.bigint() - t) / 1e6);
      }
      process.send!({ times });
    })();
  });
  process.send!({ ready: true });
}

/** Asks the child for n timed cycles; their latencies in ms. */
function childCycles(child: ChildProcess, n: number): Promise<number[]> {
  return new Promise((resolve) => {
    child.once('message', (m: { times: number[] }) => resolve(m.times));
    child.send({ n });
  });
}

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 200);
  const rounds = Number(process.argv[3] ?? 10);
  const perRound = Math.max(1, Math.round(n / rounds));
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-lease-'));
  const stack = await startLeaseManagerStack(dir, { asDeployed: true });
  const { daemon, lm, socket } = stack;
  let child: ChildProcess | undefined;
  try {
    fs.mkdirSync(path.join(dir, 'dom_md'));
    const ids = path.join(dir, 'dom_md', 'ids');
    const leases = path.join(dir, 'dom_md', 'leases');
    const lmClient = localLeaseManagerClient(`unix:${socket}`);
    await lmClient.formatLockspace({ lockspace: 'bench', path: ids, ioTimeoutSeconds: 1 });
    const loc = (resource: string, slot: number): pb.LeaseLocation => ({ lockspace: 'bench', resource, path: leases, offset: slot * 1048576 });
    await lmClient.formatLeases({ lockspace: 'bench', path: leases, leases: [loc('grpc', 0), loc('addon', 1), loc('cli', 2)] });
    await lmClient.joinLockspace({ lockspace: 'bench', path: ids, wait: true }, { timeoutMs: 60000 });

    console.log(
      `lease acquire+release, exclusive, one host, ${n} sequential cycles per case in ${rounds} alternating rounds; every lease area formatted by the lease-manager (num_hosts ${MAX_HOST_ID}); the lease-manager as deployed (log level info, a state directory) (${os.cpus().length} cores, load average ${os
        .loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')})\n`,
    );
    child = fork(__filename, [BASELINE_CHILD], { env: { ...process.env, ...daemon.env, BENCH_LEASES: leases } });
    await new Promise((resolve) => child!.once('message', resolve));
    const holder = await LeaseHolder.register({
      leaseManagerAddress: `unix:${socket}`,
      log: createLogger('bench', 'warn'),
      onFence: (why) => console.error(why),
    });
    // As every service takes a lease: LeaseHolder.withLease (acquire through the lease-manager,
    // release in sanlock on the holder's own registered connection plus a notice to the lease-manager).
    const grpcCycle = () => holder.withLease(loc('grpc', 0), 'exclusive', 'bench', async () => undefined);
    // The release path before issue 17's change, for comparison in the same run: acquire and release both through the lease-manager.
    const viaLmCycle = async () => {
      await holder.acquire(loc('grpc', 0), 'exclusive', 'bench');
      await holder.release(loc('grpc', 0));
    };
    const hopsCycle = async () => {
      await holder.leaseManager.getLockspace({ lockspace: 'bench' });
      await holder.leaseManager.getLockspace({ lockspace: 'bench' });
    };
    const times = { addon: [] as number[], grpc: [] as number[], viaLm: [] as number[], hops: [] as number[] };
    const started = { addon: 0, grpc: 0, viaLm: 0, hops: 0 };
    const cycles = { grpc: grpcCycle, viaLm: viaLmCycle, hops: hopsCycle };
    // When each withLease cycle ran (performance.now() ms), to tell the holder's own GC pauses from the lease path's tail.
    const grpcWindows: [number, number][] = [];
    const timed = async (fn: () => Promise<void>, into: number[], windows?: [number, number][]) => {
      for (let i = 0; i < perRound; i++) {
        const start = performance.now();
        const t = process.hrtime.bigint();
        await fn();
        into.push(Number(process.hrtime.bigint() - t) / 1e6);
        windows?.push([start, performance.now()]);
      }
    };
    const gcPauses: [number, number][] = [];
    const gcObserver = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) gcPauses.push([e.startTime, e.startTime + e.duration]);
    });
    await childCycles(child, 10);
    for (let i = 0; i < 10; i++) await grpcCycle();
    // The lease-manager's own time in its handlers (its gRPC duration histogram), to tell it from the transport and scheduling.
    // Of that, the acquire itself (sanlock acquire + inquire, as the lease-manager times it for sdmesh_lease_acquire_seconds).
    const handlerSeconds = async () => {
      const text = await (await fetch(`http://127.0.0.1:${lm.metricsPort}/metrics`)).text();
      const sum = (re: RegExp) => [...text.matchAll(re)].reduce((a, m) => a + Number(m[1]), 0);
      return {
        handlers: sum(/^sdmesh_grpc_server_handling_seconds_sum\{[^}]*method="LeaseManagerService\/(?:AcquireLease|ReleaseLease)"[^}]*\} (\S+)$/gm),
        acquire: sum(/^sdmesh_lease_acquire_seconds_sum\{[^}]*\} (\S+)$/gm),
      };
    };
    // Handler seconds of the withLease case only (read around each of its rounds).
    const handler = { handlers: 0, acquire: 0 };
    gcObserver.observe({ entryTypes: ['gc'] });
    for (let r = 0; r < rounds; r++) {
      // Alternate which case goes first, so neither always follows the other.
      const order = r % 2 ? (['grpc', 'addon', 'viaLm', 'hops'] as const) : (['addon', 'grpc', 'hops', 'viaLm'] as const);
      for (const c of order) {
        const before = c === 'grpc' ? await handlerSeconds() : undefined;
        const t = process.hrtime.bigint();
        if (c === 'addon') times.addon.push(...(await childCycles(child, perRound)));
        else await timed(cycles[c], times[c], c === 'grpc' ? grpcWindows : undefined);
        started[c] += Number(process.hrtime.bigint() - t) / 1e9;
        if (before) {
          // The last release notice may still be on its way: let it land before reading.
          await new Promise((resolve) => setTimeout(resolve, 20));
          const after = await handlerSeconds();
          handler.handlers += after.handlers - before.handlers;
          handler.acquire += after.acquire - before.acquire;
        }
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 20)); // the observer's last entries
    gcObserver.disconnect();
    const overlapsGc = (w: [number, number]) => gcPauses.some(([a, b]) => a < w[1] && b > w[0]);
    const withoutGc = times.grpc.filter((_, i) => !overlapsGc(grpcWindows[i]!));
    const handlerMsPerCycle = (handler.handlers * 1000) / times.grpc.length;
    const acquireMsPerCycle = (handler.acquire * 1000) / times.grpc.length;
    const addonCase = summarize('sanlock library in-process', times.addon, started.addon);
    const grpcCase = summarize('sdmesh gRPC (lease-manager, unix socket)', times.grpc, started.grpc);
    const viaLmCase = summarize('... release through the lease-manager too (before)', times.viaLm, started.viaLm);
    const hopsCase = summarize('2 GetLockspace calls, same socket (gRPC only)', times.hops, started.hops);
    printTable([addonCase, grpcCase, viaLmCase, hopsCase], 'sanlock library in-process');
    const ratio = (a: LatencySummary, b: LatencySummary, k: 'p50' | 'p99') => `${(a[k] / b[k]).toFixed(2)}x`;
    console.log('');
    printColumns(
      ['lease-manager vs in-process', 'p50', 'p99'],
      [['ratio (goal ≤ 1.5x)', ratio(grpcCase, addonCase, 'p50'), ratio(grpcCase, addonCase, 'p99')]],
    );
    console.log(
      `\nthe lease-manager's handlers took ${handlerMsPerCycle.toFixed(2)} ms per acquire+release (mean; of which its sanlock acquire + inquire ${acquireMsPerCycle.toFixed(2)} ms); the rest of a cycle through it is the two calls' transport and the processes' wake-ups`,
    );
    console.log(
      `the gRPC path adds ${(grpcCase.p50 - addonCase.p50).toFixed(2)} ms at p50 over sanlock's own cost; load average now ${os.loadavg()[0]!.toFixed(1)}`,
    );
    console.log(
      `this process (the holder) paused for GC ${gcPauses.length} times during the rounds (${gcPauses.reduce((a, [s, e]) => a + e - s, 0).toFixed(1)} ms in all); ${times.grpc.length - withoutGc.length} of ${times.grpc.length} withLease cycles overlapped a pause (without them p50 ${summarize('', withoutGc, 1).p50.toFixed(2)} / p99 ${summarize('', withoutGc, 1).p99.toFixed(2)} ms)`,
    );
    // The baseline child stays registered until here; the CLI case runs alone, after the rounds.
    child.kill();
    const cliN = Number(process.argv[4] ?? Math.min(n, 50));
    if (cliN > 0) {
      const cliCase = await measure(
        'sanlock CLI (client command), after the rounds',
        cliN,
        async () => {
          // The daemon releases asynchronously after the command exits: an immediate next acquire
          // can get EAGAIN, so retry as any CLI user would.
          for (let attempt = 0; ; attempt++) {
            try {
              execFileSync('sanlock', ['client', 'command', '-r', `bench:cli:${leases}:${2 * 1048576}`, '-c', '/bin/true'], {
                env: { ...process.env, ...daemon.env },
                stdio: 'ignore',
                timeout: 10_000,
              });
              return;
            } catch (err) {
              if (attempt >= 20) throw err;
              await new Promise((r) => setTimeout(r, 2));
            }
          }
        },
        3,
      );
      printTable([addonCase, cliCase], 'sanlock library in-process');
    }
    await holder.close();
    lmClient.close();
  } finally {
    child?.kill();
    await stack.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === BASELINE_CHILD) void baselineChild();
else runBench(main);
