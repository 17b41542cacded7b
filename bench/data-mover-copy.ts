/**
 * Copy throughput: the same copies through sdmesh (CopyVolume on a data-mover: worker process,
 * sanlock volume leases, record writes, qemu-img convert, progress over IPC) and through bare
 * `qemu-img convert` with the same flags, in one run, alternating, reported as a ratio.
 *
 *   npm run bench -- data-mover-copy [capacityMiB=1024] [dataMiB=256] [rounds=3]
 *
 * Both sides fsync the destination at the end (sdmesh does before it writes LEGAL).
 * MB/s = 10^6 bytes of the source's allocated data per second of wall time (for sdmesh: from
 * the CopyVolume call until WatchJob reports DONE, so the fixed costs are included).
 * Then the fixed cost per job alone: a tiny copy (1 MiB of data in a 64 MiB volume) both ways,
 * `rounds` × 3 times; the difference of the medians is what sdmesh adds per job.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createClient, pb } from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';

const MiB = 1024 * 1024;

/** SDMESH_BENCH_BREAKDOWN=1: services log at debug, and the fixed cost is split by the worker's milestones. */
const breakdown = process.env.SDMESH_BENCH_BREAKDOWN === '1';

/** Per job id: the worker's milestones (ms since its start) and the wall time of its report. */
const workerTimings = new Map<string, { reportedAt: number; timings: Record<string, number> }>();
/** Per job id: when the bench called CopyVolume and when it saw DONE (epoch ms). */
const clientTimes = new Map<string, { calledAt: number; doneAt: number }>();

function collectTimings(line: string): void {
  if (!line.includes('job timings')) return;
  try {
    const entry = JSON.parse(line) as { jobId?: string; time?: string; timings?: Record<string, number> };
    if (entry.jobId && entry.time && entry.timings) workerTimings.set(entry.jobId, { reportedAt: Date.parse(entry.time), timings: entry.timings });
  } catch {
    // not a JSON line
  }
}

/** Where a job's time goes, median over `jobIds`, from the CopyVolume call to DONE at the client. */
function printBreakdown(jobIds: string[]): void {
  const steps: Array<[string, string, string]> = [
    ['CopyVolume call → worker has the job (checks, queue, IPC)', 'call', 'startReceived'],
    ["record reads + checks before the leases (none with the service's lease slots)", 'startReceived', 'checked'],
    ['phase report, log line', 'checked', 'firstLeaseAsked'],
    ['phase report, log line', 'checked', 'leasesAsked'],
    ['both volume leases in one acquire (AcquireLeases)', 'leasesAsked', 'leasesHeld'],
    ['first volume lease acquire (global lease order)', 'firstLeaseAsked', 'firstLeaseHeld'],
    ['between the two acquires', 'firstLeaseHeld', 'secondLeaseAsked'],
    ['second volume lease acquire', 'secondLeaseAsked', 'leasesHeld'],
    ['records read under the leases + checks, destination ILLEGAL', 'leasesHeld', 'markedIllegal'],
    ['qemu-img convert (qemu-img map beside it)', 'markedIllegal', 'converted'],
    ['  of which: phase report, source chain opened', 'markedIllegal', 'sourceOpened'],
    ['  destination opened (O_DIRECT)', 'sourceOpened', 'destinationOpened'],
    ['  qemu-img spawned (setpriv)', 'destinationOpened', 'convertSpawned'],
    ['  qemu-img ran and exited', 'convertSpawned', 'converted'],
    ['fsync', 'converted', 'fsynced'],
    ['re-read, LEGAL + generation record', 'fsynced', 'committed'],
    ['lease release', 'committed', 'leasesReleased'],
    ['report to the service', 'leasesReleased', 'reported'],
    ['worker report → client sees DONE', 'reported', 'done'],
  ];
  const rows = jobIds.flatMap((id) => {
    const w = workerTimings.get(id);
    const c = clientTimes.get(id);
    if (!w || !c || w.timings.reported === undefined) return [];
    // Worker milestones on the wall clock: its report line was written at `reported`.
    const at: Record<string, number> = { call: c.calledAt, done: c.doneAt };
    for (const [k, v] of Object.entries(w.timings)) at[k] = w.reportedAt - (w.timings.reported - v);
    // The source's (shared) and the destination's (exclusive) lease, in whichever order the global lease order took them.
    if (at.sharedLeaseHeld !== undefined && at.exclusiveLeaseHeld !== undefined) at.firstLeaseHeld = Math.min(at.sharedLeaseHeld, at.exclusiveLeaseHeld);
    if (at.sharedLeaseAsked !== undefined && at.exclusiveLeaseAsked !== undefined) {
      at.firstLeaseAsked = Math.min(at.sharedLeaseAsked, at.exclusiveLeaseAsked);
      at.secondLeaseAsked = Math.max(at.sharedLeaseAsked, at.exclusiveLeaseAsked);
    }
    return [at];
  });
  if (!rows.length) return console.log('(no worker timings collected)');
  const ready = rows.filter((r) => r.prepared !== undefined && r.startReceived !== undefined && r.prepared <= r.startReceived).length;
  console.log(`\nthe worker was prepared (registered, connected) before its job came: ${ready} of ${rows.length} jobs`);
  const rehearsed = rows.filter((r) => r.rehearsed !== undefined && r.startReceived !== undefined && r.rehearsed <= r.startReceived).length;
  console.log(`... and had rehearsed the copy steps on its scratch domain: ${rehearsed} of ${rows.length} jobs`);
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  console.log(`\nwhere the time of a tiny sdmesh job goes (median of ${rows.length}, ms; log timestamps have 1 ms resolution):`);
  for (const [name, from, to] of steps) {
    const xs = rows.filter((r) => r[from] !== undefined && r[to] !== undefined).map((r) => r[to]! - r[from]!);
    if (xs.length) console.log(`  ${name.padEnd(58)} ${median(xs).toFixed(0).padStart(5)}`);
  }
}

interface Row {
  name: string;
  seconds: number[];
}

async function main(): Promise<void> {
  const capacityMiB = Number(process.argv[2] ?? 1024);
  const dataMiB = Number(process.argv[3] ?? 256);
  const rounds = Number(process.argv[4] ?? 3);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-copy-'));
  const mesh = new LocalMesh({
    dir,
    hosts: 1,
    scheduler: false,
    perHostServices: ['lease-manager', 'metadata-tx', 'data-mover'],
    env: { SDMESH_IO_TIMEOUT: '1', SDMESH_EVENT_HEARTBEAT_MS: '0' },
    // debug: the workers log their milestones, and the fixed cost is broken down by them (below).
    logLevel: breakdown ? 'debug' : 'warn',
    onServiceLine: breakdown ? (service, _host, line) => service === 'data-mover' && collectTimings(line) : undefined,
  });
  await mesh.start();
  const host = mesh.hosts[0]!;
  const metadata = createClient(pb.MetadataTxServiceDefinition, host.services['metadata-tx']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
  const mover = createClient(pb.DataMoverServiceDefinition, host.services['data-mover']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
  try {
    const domains: string[] = [];
    for (const name of ['bench-src', 'bench-dst']) {
      const p = path.join(mesh.storageDir, name);
      await metadata.formatDomain({ domainId: randomUUID(), name, path: p, ioTimeoutSeconds: 1 }, { timeoutMs: 60000 });
      domains.push(p);
    }
    const create = async (domainPath: string, format: pb.VolumeFormat, illegal: boolean, sizeMiB = capacityMiB) => {
      const ref = { domainPath, imageId: randomUUID(), volumeId: randomUUID() };
      await metadata.createVolume(
        { ...ref, format, allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE, capacityBytes: sizeMiB * MiB, initiallyIllegal: illegal },
        { timeoutMs: 60000 },
      );
      return { ref, file: path.join(domainPath, 'images', ref.imageId, ref.volumeId) };
    };
    const source = await create(domains[0]!, pb.VolumeFormat.VOLUME_FORMAT_RAW, false);
    // The data in 4 runs spread over the disk, the rest holes.
    const run = Math.max(1, Math.floor(dataMiB / 4));
    for (let i = 0; i < 4; i++) {
      const at = Math.floor((i * (capacityMiB - run)) / 3);
      execFileSync('dd', ['if=/dev/urandom', `of=${source.file}`, 'bs=1M', `count=${run}`, `seek=${at}`, 'conv=notrunc', 'status=none']);
    }
    const dataBytes = 4 * run * MiB;
    const sdmeshJobIds: string[] = [];
    // Warm up: lockspace joins (first lease use of each domain) are not copy cost.
    await sdmeshCopy(pb.VolumeFormat.VOLUME_FORMAT_RAW);

    async function sdmeshCopy(format: pb.VolumeFormat, from = source, sizeMiB = capacityMiB): Promise<number> {
      const dest = await create(domains[1]!, format, true, sizeMiB);
      const jobId = randomUUID();
      const t = process.hrtime.bigint();
      const calledAt = Date.now();
      await mover.copyVolume({ jobId, source: from.ref, destination: dest.ref, destinationGeneration: 0, collapse: true });
      let last: pb.Job | undefined;
      for await (const j of mover.watchJob({ jobId }, { timeoutMs: 600_000 })) last = j;
      const s = Number(process.hrtime.bigint() - t) / 1e9;
      clientTimes.set(jobId, { calledAt, doneAt: Date.now() });
      sdmeshJobIds.push(jobId);
      if (last?.status !== pb.JobStatus.JOB_STATUS_DONE) throw new Error(`sdmesh copy failed: ${last?.error?.message}`);
      return s;
    }
    // Kept until the end, like the sdmesh destinations (deleting them between runs skews timing).
    const bareFiles: string[] = [];
    async function bareCopy(format: 'raw' | 'qcow2', from = source, sizeMiB = capacityMiB): Promise<number> {
      // Same destination kind as sdmesh gets from metadata-tx, same convert flags.
      const dest = path.join(dir, `bare-${randomUUID()}`);
      if (format === 'raw') {
        fs.writeFileSync(dest, '');
        fs.truncateSync(dest, sizeMiB * MiB);
      } else execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', dest, String(sizeMiB * MiB)]);
      const flags = format === 'raw' ? ['-W'] : [];
      const t = process.hrtime.bigint();
      // Started the way the worker starts it (setpriv, own process group, stdout read).
      await new Promise<void>((resolve, reject) => {
        const child = spawn(
          'setpriv',
          [
            '--pdeathsig',
            'KILL',
            'qemu-img',
            'convert',
            '-p',
            '-U',
            '-n',
            '-t',
            'none',
            '-T',
            'none',
            '-f',
            'raw',
            '-O',
            format,
            '-m',
            '16',
            ...flags,
            from.file,
            dest,
          ],
          {
            detached: true,
            stdio: ['ignore', 'pipe', 'inherit'],
          },
        );
        child.stdout.resume();
        child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`qemu-img exited ${code}`))));
      });
      // sdmesh fsyncs the destination before it marks it LEGAL: so does the baseline.
      const fd = fs.openSync(dest, 'r+');
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      const s = Number(process.hrtime.bigint() - t) / 1e9;
      bareFiles.push(dest);
      return s;
    }

    const rows: Row[] = [
      { name: 'raw→raw   bare qemu-img', seconds: [] },
      { name: 'raw→raw   sdmesh', seconds: [] },
      { name: 'raw→qcow2 bare qemu-img', seconds: [] },
      { name: 'raw→qcow2 sdmesh', seconds: [] },
    ];
    for (let r = 0; r < rounds; r++) {
      // Alternate which goes first, so page-cache warmth does not favour one side.
      const pairs: Array<[number, () => Promise<number>]> = [
        [0, () => bareCopy('raw')],
        [1, () => sdmeshCopy(pb.VolumeFormat.VOLUME_FORMAT_RAW)],
        [2, () => bareCopy('qcow2')],
        [3, () => sdmeshCopy(pb.VolumeFormat.VOLUME_FORMAT_QCOW2)],
      ];
      if (r % 2) [pairs[0], pairs[1], pairs[2], pairs[3]] = [pairs[1]!, pairs[0]!, pairs[3]!, pairs[2]!];
      for (const [i, fn] of pairs) {
        // Start each copy with no dirty pages from the previous one (writeback throttling
        // otherwise makes whichever runs second look slow).
        execFileSync('sync');
        rows[i]!.seconds.push(await fn());
      }
    }

    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const mbps = (s: number) => dataBytes / 1e6 / s;
    console.log(
      `copy of a ${capacityMiB} MiB sparse raw volume holding ${(dataBytes / MiB).toFixed(0)} MiB of data, ${rounds} rounds, median ` +
        `(${os.cpus().length} cores, ${dir})\n`,
    );
    console.log(['case'.padEnd(26), 'median s'.padStart(9), 'MB/s'.padStart(9), 'vs bare'.padStart(8)].join('  '));
    for (const [i, row] of rows.entries()) {
      const base = rows[i - (i % 2)]!;
      const ratio = mbps(median(row.seconds)) / mbps(median(base.seconds));
      console.log(
        [
          row.name.padEnd(26),
          median(row.seconds).toFixed(3).padStart(9),
          mbps(median(row.seconds)).toFixed(1).padStart(9),
          `${ratio.toFixed(2)}x`.padStart(8),
        ].join('  '),
      );
    }

    // The fixed cost per job, which the big copies above can hide in their noise.
    const tiny = await create(domains[0]!, pb.VolumeFormat.VOLUME_FORMAT_RAW, false, 64);
    execFileSync('dd', ['if=/dev/urandom', `of=${tiny.file}`, 'bs=1M', 'count=1', 'conv=notrunc', 'status=none']);
    const bigJobs = sdmeshJobIds.length;
    const leaseTimeBefore = await leaseManagerAcquireSeconds();
    /** 3 × rounds tiny copies each way, alternating: [bare seconds, sdmesh seconds]. */
    async function tinyCopies(format: 'raw' | 'qcow2'): Promise<[number[], number[]]> {
      const [bare, sdmesh]: [number[], number[]] = [[], []];
      for (let r = 0; r < rounds * 3; r++) {
        execFileSync('sync');
        bare.push(await bareCopy(format, tiny, 64));
        execFileSync('sync');
        sdmesh.push(await sdmeshCopy(format === 'raw' ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2, tiny, 64));
      }
      return [bare, sdmesh];
    }
    const [tinyBare, tinySdmesh] = await tinyCopies('raw');
    const ms = (s: number) => `${(s * 1000).toFixed(0)} ms`;
    console.log(
      `\nfixed cost per job (1 MiB in a 64 MiB raw volume, raw→raw, median of ${rounds * 3}): bare ${ms(median(tinyBare))}, ` +
        `sdmesh ${ms(median(tinySdmesh))}, sdmesh adds ${ms(median(tinySdmesh) - median(tinyBare))}`,
    );
    if (breakdown) {
      // Give the last worker's log line a moment to arrive.
      await new Promise((r) => setTimeout(r, 500));
      printBreakdown(sdmeshJobIds.slice(bigJobs, bigJobs + rounds * 3));
      // The lease-manager's own time per acquire (its checks and sanlock's acquire), to tell it from the hop and the worker.
      const leaseTimeAfter = await leaseManagerAcquireSeconds();
      for (const mode of ['shared', 'exclusive']) {
        const [sum, count] = [0, 1].map((i) => (leaseTimeAfter[mode]?.[i] ?? 0) - (leaseTimeBefore[mode]?.[i] ?? 0));
        if (count) console.log(`  (the lease-manager's own time per ${mode} acquire in these jobs, mean: ${((sum! * 1000) / count!).toFixed(1)} ms)`);
      }
    }

    // The data rate without the fixed cost: the big copies' extra data over their extra time against
    // tiny jobs of the same kind, per side (so a job's fixed cost, measured above, is not counted twice).
    const [tinyBareQcow2, tinySdmeshQcow2] = await tinyCopies('qcow2');
    const marginal = (big: number[], small: number[]) => (dataBytes - MiB) / 1e6 / (median(big) - median(small));
    console.log(`
data rate without the fixed cost ((${(dataBytes / MiB).toFixed(0)} - 1) MiB / (median big copy - median tiny copy), same kind):`);
    for (const [name, i, bare, sd] of [
      ['raw→raw  ', 0, tinyBare, tinySdmesh],
      ['raw→qcow2', 2, tinyBareQcow2, tinySdmeshQcow2],
    ] as const) {
      const [b, m] = [marginal(rows[i]!.seconds, bare), marginal(rows[i + 1]!.seconds, sd)];
      console.log(
        `  ${name} bare ${b.toFixed(1)} MB/s, sdmesh ${m.toFixed(1)} MB/s: ${(m / b).toFixed(2)}x ` +
          `(tiny ${name.trim()} jobs: bare ${ms(median(bare))}, sdmesh ${ms(median(sd))})`,
      );
    }

    /** The lease-manager's sdmesh_lease_acquire_seconds: [sum, count] per mode (successful acquires). */
    async function leaseManagerAcquireSeconds(): Promise<Record<string, [number, number]>> {
      const text = await (await fetch(`http://127.0.0.1:${host.services['lease-manager']!.metricsPort}/metrics`)).text();
      const out: Record<string, [number, number]> = {};
      for (const m of text.matchAll(/^sdmesh_lease_acquire_seconds_(sum|count)\{([^}]*)\} (\S+)$/gm)) {
        if (!m[2]!.includes('result="ok"')) continue;
        const mode = /mode="(\w+)"/.exec(m[2]!)?.[1] ?? '';
        const entry = (out[mode] ??= [0, 0]);
        entry[m[1] === 'sum' ? 0 : 1] += Number(m[3]);
      }
      return out;
    }
  } finally {
    metadata.close();
    mover.close();
    await mesh.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
