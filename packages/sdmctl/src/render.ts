import { pb } from '@sdmesh/common';
import { ago, bytes, duration, enumName, keyValues, shortIds, table, time } from './output';

/** Human views of the API's resources (tables and detail blocks). */

export const statusName = (s: pb.OperationStatus) => enumName(pb.operationStatusToJSON(s), 'OPERATION_STATUS_');
export const typeName = (t: pb.OperationType) => enumName(pb.operationTypeToJSON(t), 'OPERATION_TYPE_');
export const formatName = (f: pb.VolumeFormat) => enumName(pb.volumeFormatToJSON(f), 'VOLUME_FORMAT_');
export const allocationName = (a: pb.VolumeAllocation) => enumName(pb.volumeAllocationToJSON(a), 'VOLUME_ALLOCATION_');
export const legalityName = (l: pb.Legality) => enumName(pb.legalityToJSON(l), 'LEGALITY_');
export const domainStatusName = (s: pb.DomainStatus) => enumName(pb.domainStatusToJSON(s), 'DOMAIN_STATUS_');
export const livenessName = (l: pb.HostLiveness) => enumName(pb.hostLivenessToJSON(l), 'HOST_LIVENESS_');

/** "operations/<uuid>" → "<uuid>" (commands accept both). */
export const opId = (name: string) => name.replace(/^operations\//, '');

export function domainsTable(list: pb.StorageDomain[]): string {
  return table(
    ['ID', 'NAME', 'STATUS', 'DISKS', 'VOLUMES', 'FREE', 'CAPACITY', 'PATH'],
    list.map((d) => [d.id, d.name, domainStatusName(d.status), d.imageCount, d.volumeCount, bytes(d.freeBytes), bytes(d.capacityBytes), d.path]),
  );
}

export function domainDetail(d: pb.StorageDomain): string {
  return keyValues([
    ['ID', d.id],
    ['Name', d.name],
    ['Path', d.path],
    ['Status', domainStatusName(d.status) + (d.statusMessage ? ` (${d.statusMessage})` : '')],
    ['Format version', d.formatVersion],
    ['Created', time(d.createTime)],
    ['Capacity', bytes(d.capacityBytes)],
    ['Free', bytes(d.freeBytes)],
    ['Disks', d.imageCount],
    ['Volumes', d.volumeCount],
    ['Hosts connected', d.hostsConnected.length ? d.hostsConnected.join(', ') : '(none)'],
  ]);
}

const actual = (d: pb.Disk) => d.volumes.reduce((s, v) => s + v.actualSizeBytes, 0);

/** template, clone of <template id prefix>, or '-'. */
const diskRole = (d: pb.Disk) => (d.template ? 'template' : d.templateDiskId ? `clone of ${d.templateDiskId.slice(0, 8)}` : '-');

export function disksTable(list: pb.Disk[]): string {
  return table(
    ['ID', 'DOMAIN', 'CAPACITY', 'ALLOCATED', 'FORMAT', 'VOLUMES', 'LEGALITY', 'ROLE', 'DESCRIPTION'],
    list.map((d) => [
      d.id,
      d.storageDomainId,
      bytes(d.capacityBytes),
      bytes(actual(d)),
      formatName(d.format),
      d.volumes.length,
      legalityName(d.legality),
      diskRole(d),
      d.description,
    ]),
  );
}

export function volumesTable(volumes: pb.Volume[]): string {
  return table(
    ['VOLUME', 'PARENT', 'FORMAT', 'ALLOCATION', 'ALLOCATED', 'LEGALITY', 'GEN', 'LEASE', 'PATH'],
    volumes.map((v) => [
      v.id,
      v.parentId ? v.parentId.slice(0, 8) : '-',
      formatName(v.format),
      allocationName(v.allocation),
      bytes(v.actualSizeBytes),
      legalityName(v.legality),
      v.generation,
      v.lease ? `slot ${Math.round(v.lease.offset / 1048576)}` : '-',
      v.path,
    ]),
  );
}

export function diskDetail(d: pb.Disk): string {
  return (
    keyValues([
      ['Disk', d.id],
      ['Domain', d.storageDomainId],
      ['Description', d.description],
      ['Capacity', bytes(d.capacityBytes)],
      ['Allocated', bytes(actual(d))],
      ['Format', formatName(d.format)],
      ['Legality', legalityName(d.legality)],
      ['Template', d.template ? 'yes (read-only)' : 'no'],
      ['Clone of', d.templateDiskId || '-'],
    ]) +
    '\nVolumes (base first):\n' +
    volumesTable(d.volumes)
  );
}

/** Which hosts disks are published to (CSI ControllerPublishVolume; DiskAttachmentService). */
export function attachmentsTable(list: pb.DiskAttachment[]): string {
  return table(
    ['DISK', 'DOMAIN', 'HOST', 'MODE', 'READ-ONLY', 'GEN', 'SINCE'],
    list.map((a) => [
      a.diskId,
      a.storageDomainId,
      a.host,
      pb.attachmentModeToJSON(a.mode).replace('ATTACHMENT_MODE_', '').toLowerCase(),
      a.readonly ? 'yes' : 'no',
      a.generation,
      a.createTime ? a.createTime.toISOString() : '-',
    ]),
  );
}

const countLiveness = (h: pb.Host) => {
  const values = Object.values(h.liveness);
  return `${values.filter((l) => l === pb.HostLiveness.HOST_LIVENESS_LIVE).length}/${Object.keys(h.hostIds).filter((k) => k).length || values.length}`;
};

export function hostsTable(list: pb.Host[]): string {
  return table(
    ['NAME', 'HEALTHY', 'HOST ID', 'LIVE IN', 'JOBS', 'QUEUED', 'MB/S', 'SPM', 'LAST HEARTBEAT'],
    list.map((h) => [
      h.name,
      (h.healthy ? 'yes' : 'NO') + (h.maintenance ? ' (maintenance)' : ''),
      [...new Set(Object.values(h.hostIds))].join(',') || '-',
      countLiveness(h),
      `${h.load?.runningJobs ?? 0}/${h.load?.maxConcurrentJobs ?? 0}`,
      h.load?.queuedJobs ?? 0,
      (h.load?.recentMbps ?? 0).toFixed(1),
      h.isSpm ? 'yes' : '-',
      ago(h.lastHeartbeatTime),
    ]),
  );
}

export function hostDetail(h: pb.Host): string {
  const domains = [...new Set([...Object.keys(h.hostIds), ...Object.keys(h.liveness), ...h.reachableDomains])].filter((d) => d);
  return (
    keyValues([
      ['Host', h.name],
      ['Healthy', h.healthy ? 'yes' : 'NO'],
      ['Maintenance', h.maintenance ? 'yes: no step is placed here (sdmctl hosts activate brings it back)' : 'no'],
      ['Last heartbeat', `${time(h.lastHeartbeatTime)} (${ago(h.lastHeartbeatTime)})`],
      ['Jobs', `${h.load?.runningJobs ?? 0} running, ${h.load?.queuedJobs ?? 0} queued, at most ${h.load?.maxConcurrentJobs ?? 0}`],
      ['Throughput', `${(h.load?.recentMbps ?? 0).toFixed(1)} MB/s over the last minute`],
      ['SPM', h.isSpm ? 'holds the SPM lease' : 'no'],
      ['lease-manager', h.leaseManagerAddress],
      ['metadata-tx', h.metadataTxAddress],
      ['data-mover', h.dataMoverAddress],
      ['gc', h.gcAddress],
    ]) +
    (domains.length
      ? '\nDomains:\n' +
        table(
          ['DOMAIN', 'HOST ID', 'LIVENESS', 'REACHABLE'],
          domains.map((d) => [
            d,
            h.hostIds[d] ?? '-',
            h.liveness[d] !== undefined ? livenessName(h.liveness[d]) : '-',
            h.reachableDomains.includes(d) ? 'yes' : 'no',
          ]),
        )
      : '')
  );
}

const progressText = (p: pb.Progress | undefined) => (p && (p.percent > 0 || p.bytesTotal > 0) ? `${p.percent.toFixed(0)}%` : '-');

export function opsTable(list: pb.Operation[]): string {
  return table(
    ['OPERATION', 'TYPE', 'STATUS', 'STEP', 'PROGRESS', 'CREATED', 'TARGET'],
    list.map((o) => [
      opId(o.name),
      typeName(o.type),
      statusName(o.status),
      shortIds(o.currentStep) || '-',
      progressText(o.progress),
      time(o.createTime),
      o.targetResources.join(' '),
    ]),
  );
}

export function stepsTable(steps: pb.OperationStep[]): string {
  return table(
    ['STEP', 'STATUS', 'HOST', 'ATTEMPT', 'TIME', 'ERROR'],
    steps.map((s) => [
      shortIds(s.name),
      statusName(s.status),
      s.host || '-',
      s.attempt || 1,
      s.startTime ? duration((s.endTime ?? new Date()).getTime() - s.startTime.getTime()) : '-',
      s.error?.message ?? '',
    ]),
  );
}

export function opDetail(o: pb.Operation): string {
  const result =
    o.result?.$case === 'disk'
      ? `disk ${o.result.disk.id} in domain ${o.result.disk.storageDomainId}`
      : o.result?.$case === 'storageDomain'
        ? `storage domain ${o.result.storageDomain.id} (${o.result.storageDomain.name})`
        : '';
  return (
    keyValues([
      ['Operation', o.name],
      ['Type', typeName(o.type)],
      ['Status', statusName(o.status)],
      ['Request id', o.requestId],
      ['Step', o.currentStep ? shortIds(o.currentStep) : undefined],
      ['Progress', o.progress && o.progress.bytesTotal > 0 ? `${o.progress.percent.toFixed(1)}% of ${bytes(o.progress.bytesTotal)}` : undefined],
      ['Error', o.error ? `${o.error.message}${o.error.reason ? ` [${o.error.reason}]` : ''}` : undefined],
      ['Created', time(o.createTime)],
      ['Updated', time(o.updateTime)],
      ['Targets', o.targetResources.join(', ')],
      ['Result', result || undefined],
      ['Owner', o.owner || undefined],
    ]) + (o.steps.length ? '\nSteps:\n' + stepsTable(o.steps) : '')
  );
}

export function isTerminal(s: pb.OperationStatus): boolean {
  return (
    s === pb.OperationStatus.OPERATION_STATUS_DONE || s === pb.OperationStatus.OPERATION_STATUS_FAILED || s === pb.OperationStatus.OPERATION_STATUS_ABORTED
  );
}
