import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** The metrics of metadata-tx, on the service's registry. */
export class MetadataTxMetrics {
  readonly duration: Histogram<'op'>;
  readonly leaseWait: Histogram;
  readonly groupSize: Histogram;
  readonly slotIndexBuilds: Counter<'how'>;
  readonly failures: Counter<'op' | 'reason'>;
  readonly domainFree: Gauge<'domain'>;
  readonly domainCapacity: Gauge<'domain'>;

  constructor(registry: Registry) {
    const registers = [registry];
    this.duration = new Histogram({
      name: 'sdmesh_metadata_tx_duration_seconds',
      help: 'Duration of metadata transactions (including the wait for the domain lease), by operation.',
      labelNames: ['op'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.leaseWait = new Histogram({
      name: 'sdmesh_metadata_tx_lease_wait_seconds',
      help: 'Time spent waiting for the domain metadata lease.',
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60],
      registers,
    });
    this.groupSize = new Histogram({
      name: 'sdmesh_metadata_tx_group_size',
      help: 'Transactions run in one hold of a domain metadata lease (group commit).',
      buckets: [1, 2, 4, 8, 16, 32, 64, 128],
      registers,
    });
    this.slotIndexBuilds = new Counter({
      name: 'sdmesh_metadata_tx_slot_index_builds_total',
      help: 'Lease slot indexes made true at the start of a hold after another holder: by a scan of every record, or from the slot journal.',
      labelNames: ['how'],
      registers,
    });
    this.failures = new Counter({
      name: 'sdmesh_metadata_tx_failures_total',
      help: 'Failed metadata operations, by operation and reason.',
      labelNames: ['op', 'reason'],
      registers,
    });
    this.domainFree = new Gauge({ name: 'sdmesh_domain_free_bytes', help: 'Free bytes on the storage of a domain.', labelNames: ['domain'], registers });
    this.domainCapacity = new Gauge({
      name: 'sdmesh_domain_capacity_bytes',
      help: 'Capacity in bytes of the storage of a domain.',
      labelNames: ['domain'],
      registers,
    });
  }
}
