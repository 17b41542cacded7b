import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** The metrics of the gc, on the service's registry. */
export class GcMetrics {
  /** result: collected | not_holder (another host holds the GC lease) | error */
  readonly passes: Counter<'result'>;
  readonly itemsRemoved: Counter<'kind'>;
  readonly bytesFreed: Counter;
  readonly passDuration: Histogram;
  readonly backlog: Gauge<'domain'>;
  readonly itemsSkipped: Counter<'reason'>;

  constructor(registry: Registry) {
    const registers = [registry];
    this.passes = new Counter({
      name: 'sdmesh_gc_passes_total',
      help: 'GC passes, by result (collected, not_holder, error).',
      labelNames: ['result'],
      registers,
    });
    this.itemsRemoved = new Counter({ name: 'sdmesh_gc_items_removed_total', help: 'Garbage items removed, by kind.', labelNames: ['kind'], registers });
    this.bytesFreed = new Counter({ name: 'sdmesh_gc_bytes_freed_total', help: 'Allocated bytes of the files the GC removed.', registers });
    this.passDuration = new Histogram({
      name: 'sdmesh_gc_pass_duration_seconds',
      help: 'Duration of GC passes that collected (held the GC lease).',
      buckets: [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900],
      registers,
    });
    this.backlog = new Gauge({
      name: 'sdmesh_gc_backlog_items',
      help: 'Garbage items left in a domain after the last pass this host collected.',
      labelNames: ['domain'],
      registers,
    });
    this.itemsSkipped = new Counter({
      name: 'sdmesh_gc_items_skipped_total',
      help: 'Garbage items a pass left, by reason (grace, lease_held, error, gone).',
      labelNames: ['reason'],
      registers,
    });
  }
}
