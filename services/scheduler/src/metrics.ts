import { pb } from '@sdmesh/common';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

/** The scheduler's metrics, on the service's registry. */
export class SchedulerMetrics {
  readonly operations: Counter<'type' | 'outcome'>;
  readonly duration: Histogram<'type'>;
  readonly running: Gauge;
  readonly queueDepth: Gauge;
  readonly lockWait: Histogram;
  readonly placements: Counter<'host' | 'step'>;
  readonly lastProgress: Gauge<'operation' | 'type'>;
  readonly hostsHealthy: Gauge;
  readonly hostsInMaintenance: Gauge;
  readonly strayLockspaceLeaves: Counter<'host'>;
  readonly operationWatchers: Gauge;
  readonly operationsPurged: Counter<'stage'>;
  readonly attachmentChanges: Counter<'change'>;
  readonly attachmentLegacyReads: Counter;
  readonly attachmentLegacyRecords: Counter<'outcome'>;
  readonly attachmentUpgradeDone: Gauge;

  constructor(registry: Registry) {
    const registers = [registry];
    this.operations = new Counter({
      name: 'sdmesh_scheduler_operations_total',
      help: 'Operations that ended, by type (CREATE_DISK, MOVE_DISK, ...) and outcome (done, failed, aborted).',
      labelNames: ['type', 'outcome'],
      registers,
    });
    // Every type and outcome from 0: increase() misses the first increment of a series that
    // appears at 1, so the "operations failing" alert would not count a type's first failure.
    for (const t of Object.values(pb.OperationType)) {
      if (typeof t !== 'number' || t <= pb.OperationType.OPERATION_TYPE_UNSPECIFIED) continue;
      const type = pb.operationTypeToJSON(t).replace('OPERATION_TYPE_', '');
      for (const outcome of ['done', 'failed', 'aborted']) this.operations.inc({ type, outcome }, 0);
    }
    this.duration = new Histogram({
      name: 'sdmesh_scheduler_operation_duration_seconds',
      help: 'Operation duration from creation to end, by type.',
      labelNames: ['type'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600],
      registers,
    });
    this.running = new Gauge({ name: 'sdmesh_scheduler_operations_running', help: 'Operations this replica is running now.', registers });
    this.queueDepth = new Gauge({
      name: 'sdmesh_scheduler_queue_depth',
      help: 'Operations of this replica waiting for engine locks (wait_for_locks) before their first step.',
      registers,
    });
    this.lockWait = new Histogram({
      name: 'sdmesh_scheduler_lock_wait_seconds',
      help: 'Time operations waited for their engine locks.',
      buckets: [0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800],
      registers,
    });
    this.placements = new Counter({
      name: 'sdmesh_scheduler_placements_total',
      help: 'Steps sent to a host, by host and step kind (format, create_volume, copy_volume, delete_image, ...).',
      labelNames: ['host', 'step'],
      registers,
    });
    this.lastProgress = new Gauge({
      name: 'sdmesh_scheduler_operation_last_progress_timestamp_seconds',
      help: 'Unix time of the last progress or step change of each running operation (alert when it stops moving).',
      labelNames: ['operation', 'type'],
      registers,
    });
    this.hostsHealthy = new Gauge({ name: 'sdmesh_scheduler_hosts_healthy', help: 'Hosts this replica sees as healthy.', registers });
    this.hostsInMaintenance = new Gauge({
      name: 'sdmesh_scheduler_hosts_in_maintenance',
      help: 'Hosts in maintenance or entering it (no step is placed on them).',
      registers,
    });
    this.strayLockspaceLeaves = new Counter({
      name: 'sdmesh_scheduler_stray_lockspace_leaves_total',
      help: 'Times a host was found in a lockspace it must have left (domain deactivated or removed, host in maintenance) and told to leave it.',
      labelNames: ['host'],
      registers,
    });
    this.operationWatchers = new Gauge({
      name: 'sdmesh_scheduler_operation_watchers',
      help: 'Open subscriptions to one operation (WatchOperation and WaitOperation calls) on this replica.',
      registers,
    });
    this.operationsPurged = new Counter({
      name: 'sdmesh_scheduler_operations_purged_total',
      help: 'Ended operations purged by this replica: stage "record" (retention passed, a tombstone is left), "request_id" (the tombstone removed).',
      labelNames: ['stage'],
      registers,
    });
    for (const stage of ['record', 'request_id']) this.operationsPurged.inc({ stage }, 0);
    this.attachmentChanges = new Counter({
      name: 'sdmesh_scheduler_disk_attachment_changes_total',
      help: "Disk attachments changed by this replica: published, unpublished, fenced (unpublished from a dead host, generation bumped), dead_shared (a dead host's shared attachment removed while other hosts keep theirs: the bump is owed), refused_not_dead.",
      labelNames: ['change'],
      registers,
    });
    for (const change of ['published', 'unpublished', 'fenced', 'dead_shared', 'refused_not_dead']) this.attachmentChanges.inc({ change }, 0);
    this.attachmentLegacyReads = new Counter({
      name: 'sdmesh_scheduler_disk_attachment_legacy_reads_total',
      help: 'KV reads of old-format attachment keys (disk.<disk id>) by calls of this replica: one per call until the one-time upgrade is done, then only for a disk an older replica wrote in the old format.',
      registers,
    });
    this.attachmentLegacyRecords = new Counter({
      name: 'sdmesh_scheduler_disk_attachment_legacy_records_total',
      help: 'Old-format attachment records seen by this replica: migrated (moved to the new key), after_upgrade (written after the upgrade marker: an older replica runs beside this one), refused (unreadable, or newer than the record under the new key: left for an operator).',
      labelNames: ['outcome'],
      registers,
    });
    for (const outcome of ['migrated', 'after_upgrade', 'refused']) this.attachmentLegacyRecords.inc({ outcome }, 0);
    this.attachmentUpgradeDone = new Gauge({
      name: 'sdmesh_scheduler_disk_attachment_upgrade_done',
      help: '1 when calls of this replica no longer read old-format attachment keys (the one-time upgrade is done and followed by its watch), else 0.',
      registers,
    });
  }
}
