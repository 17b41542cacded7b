/**
 * Lease acquire+release latency: through the lease-manager's gRPC API (what every sdmesh
 * service pays) next to sanlock itself in the same run — the addon called in-process (the
 * floor: sanlock's own cost) and sanlock's CLI (`sanlock client command -r … -c /bin/true`,
 * which also pays a process start).
 *
 * Every case runs in a child process of its own (sanlock knows a holder by its pid, and a process
 * registers once), so the cases can alternate in rounds: on a shared machine all see the same
 * load. The lease-manager cases are LeaseHolder.withLease, as services take leases (acquire
 * through the lease-manager, release in sanlock by the holder itself plus a notice), once per
 * transport: gRPC on the lease socket, and the lease frame socket (lease-frames.ts, the default
 * since session 9). Two GetLockspace calls per transport are what two hops cost with no sanlock
 * work at all.
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
import { PerformanceObserver } from 'node:perf_hooks';
import * as sanlock from '@sdmesh/sanlock';
import { createLogger, LeaseHolder, localLeaseManagerClient, MAX_HOST_ID, pb } from '@sdmesh/common';
import { measure, printColumns, printTable, runBench, startLeaseManagerStack, summarize, type LatencySummary } from './lib';

const CHILD = '--bench-child';
type ChildKind = 'addon' | 'grpc' | 'frames';
type CaseName = ChildKind | 'grpcHops' | 'framesHops';

/**
 * A child: `addon` registers with the daemon and times the addon's own acquire+release; `grpc` and
 * `frames` register a LeaseHolder on that transport and time withLease cycles (`hops: true`: two
 * GetLockspace calls instead). Each reports its latencies (ms) and its GC pauses meanwhile.
 */
async function benchChild(kind: ChildKind): Promise<void> {
  const gcPauses: number[] = [];
  new PerformanceObserver((list) => gcPauses.push(...list.getEntries().map((e) => e.duration))).observe({ entryTypes: ['gc'] });
  const timed = async (n: number, fn: () => Promise<unknown>) => {
    const times: number[] = [];
    for (let i = 0; i < n; i++) {
      const t = process.hrtime.bigint();
      await fn();
      times.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    return times;
  };
  let cycle: () => Promise<unknown>;
  let hops: () => Promise<unknown> = () => Promise.resolve();
  if (kind === 'addon') {
    sanlock.setRunDir(process.env.SANLOCK_RUN_DIR!);
    const client = sanlock.registerProcess();
    await client.inquire();
    const res = [{ name: 'addon', path: process.env.BENCH_LEASES!, offset: 1048576 }];
    cycle = async () => {
      await client.acquire('bench', res);
      await client.release('bench', res);
    };
  } else {
    const holder = await LeaseHolder.register({
      leaseManagerAddress: process.env.BENCH_LM_ADDRESS!,
      log: createLogger('bench', 'warn'),
      onFence: (why) => console.error(why),
      transport: kind,
    });
    const loc = { lockspace: 'bench', resource: kind, path: process.env.BENCH_LEASES!, offset: (kind === 'grpc' ? 0 : 3) * 1048576 };
    cycle = () => holder.withLease(loc, 'exclusive', 'bench', async () => undefined);
    hops = async () => {
      await holder.leaseCalls.getLockspace({ lockspace: 'bench' });
      await holder.leaseCalls.getLockspace({ lockspace: 'bench' });
    };
  }
  process.on('message', (msg: { n: number; hops?: boolean }) => {
    void (async () => {
      gcPauses.length = 0;
      const times = await timed(msg.n, msg.hops ? hops : cycle);
      // The last release notice may still be on its way: let it land before the next case starts.
      await new Promise((resolve) => setTimeout(resolve, 20));
      process.send!({ times, gcPauses });
    })();
  });
  process.send!({ ready: true });
}

/** Asks a child for n timed cycles: their latencies (ms) and the child's GC pauses meanwhile. */
function childCycles(child: ChildProcess, n: number, hops = false): Promise<{ times: number[]; gcPauses: number[] }> {
  return new Promise((resolve) => {
    child.once('message', (m: { times: number[]; gcPauses: number[] }) => resolve(m));
    child.send({ n, hops });
  });
}

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 200);
  const rounds = Number(process.argv[3] ?? 10);
  const perRound = Math.max(1, Math.round(n / rounds));
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-lease-'));
  const stack = await startLeaseManagerStack(dir, { asDeployed: true });
  const { daemon, lm, socket } = stack;
  const children: ChildProcess[] = [];
  try {
    fs.mkdirSync(path.join(dir, 'dom_md'));
    const ids = path.join(dir, 'dom_md', 'ids');
    const leases = path.join(dir, 'dom_md', 'leases');
    const lmClient = localLeaseManagerClient(`unix:${socket}`);
    await lmClient.formatLockspace({ lockspace: 'bench', path: ids, ioTimeoutSeconds: 1 });
    const loc = (resource: string, slot: number): pb.LeaseLocation => ({ lockspace: 'bench', resource, path: leases, offset: slot * 1048576 });
    await lmClient.formatLeases({ lockspace: 'bench', path: leases, leases: [loc('grpc', 0), loc('addon', 1), loc('cli', 2), loc('frames', 3)] });
    await lmClient.joinLockspace({ lockspace: 'bench', path: ids, wait: true }, { timeoutMs: 60000 });

    console.log(
      `lease acquire+release, exclusive, one host, ${n} sequential cycles per case in ${rounds} alternating rounds; every lease area formatted by the lease-manager (num_hosts ${MAX_HOST_ID}); the lease-manager as deployed (log level info, a state directory) (${os.cpus().length} cores, load average ${os
        .loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')})\n`,
    );
    const forkChild = async (kind: ChildKind) => {
      const env: NodeJS.ProcessEnv = { ...process.env, ...daemon.env, BENCH_LEASES: leases, BENCH_LM_ADDRESS: `unix:${socket}` };
      delete env.SDMESH_LEASE_TRANSPORT; // each holder child's transport is its case's
      const c = fork(__filename, [CHILD, kind], { env });
      children.push(c);
      await new Promise((resolve) => c.once('message', resolve));
      return c;
    };
    const child = { addon: await forkChild('addon'), grpc: await forkChild('grpc'), frames: await forkChild('frames') };
    const cases: Record<CaseName, { child: ChildProcess; hops: boolean }> = {
      addon: { child: child.addon, hops: false },
      grpc: { child: child.grpc, hops: false },
      frames: { child: child.frames, hops: false },
      grpcHops: { child: child.grpc, hops: true },
      framesHops: { child: child.frames, hops: true },
    };
    const times: Record<CaseName, number[]> = { addon: [], grpc: [], frames: [], grpcHops: [], framesHops: [] };
    const started: Record<CaseName, number> = { addon: 0, grpc: 0, frames: 0, grpcHops: 0, framesHops: 0 };
    const gc = { grpc: [] as number[], frames: [] as number[] };
    for (const c of ['addon', 'grpc', 'frames'] as const) await childCycles(child[c], 10); // warm-up
    // The lease-manager's own time in its handlers (its call duration histogram, both transports), to tell it from the transport and scheduling.
    // Of that, the acquire itself (sanlock acquire + inquire, as the lease-manager times it for sdmesh_lease_acquire_seconds).
    const handlerSeconds = async () => {
      const text = await (await fetch(`http://127.0.0.1:${lm.metricsPort}/metrics`)).text();
      const sum = (re: RegExp) => [...text.matchAll(re)].reduce((a, m) => a + Number(m[1]), 0);
      return {
        handlers: sum(/^sdmesh_grpc_server_handling_seconds_sum\{[^}]*method="LeaseManagerService\/(?:AcquireLease|ReleaseLease)"[^}]*\} (\S+)$/gm),
        acquire: sum(/^sdmesh_lease_acquire_seconds_sum\{[^}]*\} (\S+)$/gm),
      };
    };
    // Handler seconds of the withLease cases (read around each of their rounds).
    const handler = { handlers: 0, acquire: 0 };
    const withLeaseCases: readonly CaseName[] = ['grpc', 'frames'];
    for (let r = 0; r < rounds; r++) {
      // Rotate which case goes first, so none always follows another.
      const order: CaseName[] = ['addon', 'grpc', 'frames', 'grpcHops', 'framesHops'];
      for (let k = 0; k < r % order.length; k++) order.push(order.shift()!);
      for (const c of order) {
        const before = withLeaseCases.includes(c) ? await handlerSeconds() : undefined;
        const t = process.hrtime.bigint();
        const out = await childCycles(cases[c].child, perRound, cases[c].hops);
        started[c] += Number(process.hrtime.bigint() - t) / 1e9;
        times[c].push(...out.times);
        if (c === 'grpc' || c === 'frames') gc[c].push(...out.gcPauses);
        if (before) {
          const after = await handlerSeconds();
          handler.handlers += after.handlers - before.handlers;
          handler.acquire += after.acquire - before.acquire;
        }
      }
    }
    const cycles = times.grpc.length + times.frames.length;
    const handlerMsPerCycle = (handler.handlers * 1000) / cycles;
    const acquireMsPerCycle = (handler.acquire * 1000) / cycles;
    const addonCase = summarize('sanlock library in-process', times.addon, started.addon);
    const grpcCase = summarize('withLease, lease-manager over gRPC (unix socket)', times.grpc, started.grpc);
    const framesCase = summarize('withLease, lease-manager over the frame socket', times.frames, started.frames);
    const grpcHopsCase = summarize('2 GetLockspace calls, gRPC', times.grpcHops, started.grpcHops);
    const framesHopsCase = summarize('2 GetLockspace calls, frame socket', times.framesHops, started.framesHops);
    printTable([addonCase, grpcCase, framesCase, grpcHopsCase, framesHopsCase], 'sanlock library in-process');
    const ratio = (a: LatencySummary, b: LatencySummary, k: 'p50' | 'p99') => `${(a[k] / b[k]).toFixed(2)}x`;
    console.log('');
    printColumns(
      ['lease-manager vs in-process', 'p50', 'p99'],
      [
        ['gRPC: ratio (goal ≤ 1.5x)', ratio(grpcCase, addonCase, 'p50'), ratio(grpcCase, addonCase, 'p99')],
        ['frame socket: ratio (goal ≤ 1.5x)', ratio(framesCase, addonCase, 'p50'), ratio(framesCase, addonCase, 'p99')],
      ],
    );
    console.log(
      `\nthe lease-manager's handlers took ${handlerMsPerCycle.toFixed(2)} ms per acquire+release (mean of both transports; of which its sanlock acquire + inquire ${acquireMsPerCycle.toFixed(2)} ms); the rest of a cycle through it is the call's transport and the processes' wake-ups`,
    );
    console.log(
      `the lease-manager adds ${(grpcCase.p50 - addonCase.p50).toFixed(2)} ms (gRPC) / ${(framesCase.p50 - addonCase.p50).toFixed(2)} ms (frame socket) at p50 over sanlock's own cost; load average now ${os
        .loadavg()
        .map((l) => l.toFixed(1))
        .join(' ')}`,
    );
    for (const c of ['grpc', 'frames'] as const)
      console.log(`the ${c} holder paused for GC ${gc[c].length} times during its withLease rounds (${gc[c].reduce((a, d) => a + d, 0).toFixed(1)} ms in all)`);
    // The children stay registered until here; the CLI case runs alone, after the rounds.
    for (const c of children) c.kill();
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
    lmClient.close();
  } finally {
    for (const c of children) c.kill();
    await stack.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === CHILD) void benchChild(process.argv[3] as ChildKind);
else runBench(main);
