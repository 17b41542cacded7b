import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** The metrics of the data-mover, on the service's registry. */
export class DataMoverMetrics {
  readonly bytesCopied: Counter;
  readonly copyDuration: Histogram<'result'>;
  readonly throughput: Gauge;
  readonly jobsRunning: Gauge;
  readonly jobsQueued: Gauge;
  readonly failures: Counter<'reason'>;
  readonly volumeJobs: Counter<'kind' | 'result'>;
  readonly volumeJobDuration: Histogram<'kind'>;
  readonly bytesFreed: Counter;

  constructor(registry: Registry) {
    const registers = [registry];
    this.bytesCopied = new Counter({
      name: 'sdmesh_data_mover_bytes_copied_total',
      help: 'Allocated (non-zero) source bytes copied by this host, counted as qemu-img progresses (holes are not counted).',
      registers,
    });
    this.copyDuration = new Histogram({
      name: 'sdmesh_data_mover_copy_duration_seconds',
      help: 'Duration of copy jobs from start of the worker to the end, by result (done, failed, aborted).',
      labelNames: ['result'],
      buckets: [0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200],
      registers,
    });
    this.throughput = new Gauge({
      name: 'sdmesh_data_mover_throughput_mbps',
      help: 'Copy throughput of this host over the last minute, MB/s (10^6 bytes of allocated data).',
      registers,
    });
    this.jobsRunning = new Gauge({ name: 'sdmesh_data_mover_jobs_running', help: 'Copy jobs running (a worker process each).', registers });
    this.jobsQueued = new Gauge({ name: 'sdmesh_data_mover_jobs_queued', help: 'Copy jobs waiting for a free slot (--max-concurrent-jobs).', registers });
    this.failures = new Counter({
      name: 'sdmesh_data_mover_job_failures_total',
      help: 'Copy jobs that failed or were aborted, by reason (GENERATION_MISMATCH, LEASE_HELD, ABORTED, WORKER_DIED, ...).',
      labelNames: ['reason'],
      registers,
    });
    this.volumeJobs = new Counter({
      name: 'sdmesh_data_mover_volume_jobs_total',
      help: 'Volume jobs (extend, sparsify, amend, add-bitmap, remove-bitmap, clear-bitmaps) ended, by kind and result (done, failed, aborted).',
      labelNames: ['kind', 'result'],
      registers,
    });
    this.volumeJobDuration = new Histogram({
      name: 'sdmesh_data_mover_volume_job_duration_seconds',
      help: 'Duration of volume jobs from the start of the worker to the end, by kind.',
      labelNames: ['kind'],
      buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800],
      registers,
    });
    this.bytesFreed = new Counter({
      name: 'sdmesh_data_mover_sparsified_bytes_total',
      help: 'Bytes of zeroed data whose space sparsify jobs gave back (holes punched, zero clusters).',
      registers,
    });
  }
}

/** Bytes over a sliding window, for "recent MB/s". */
export class ThroughputWindow {
  private samples: Array<{ t: number; bytes: number }> = [];
  constructor(
    private readonly windowMs = 60_000,
    private readonly now: () => number = Date.now,
  ) {}

  add(bytes: number): void {
    if (bytes > 0) this.samples.push({ t: this.now(), bytes });
    this.trim();
  }

  /** MB/s (10^6 bytes) over the window (or since the first sample, when the window is younger). */
  mbps(): number {
    this.trim();
    if (!this.samples.length) return 0;
    const now = this.now();
    const span = Math.max(1000, Math.min(this.windowMs, now - this.samples[0]!.t + 1000));
    const bytes = this.samples.reduce((s, x) => s + x.bytes, 0);
    return bytes / 1e6 / (span / 1000);
  }

  private trim(): void {
    const cutoff = this.now() - this.windowMs;
    while (this.samples.length && this.samples[0]!.t < cutoff) this.samples.shift();
  }
}
