import { pb } from '@sdmesh/common';
import { bytes, enumName, shortIds } from './output';
import { legalityName, statusName } from './render';

export const EVENT_KINDS = ['domain', 'volume', 'host', 'lease', 'lockspace', 'operation', 'job', 'gc', 'service', 'diskAttachment'] as const;

const kind = (text: string) => enumName(text, 'KIND_');
const short = (id: string) => (id ? id.slice(0, 8) : '-');
const err = (e: pb.ErrorStatus | undefined) => (e?.message ? ` error="${e.message}"${e.reason ? ` [${e.reason}]` : ''}` : '');
const progress = (p: pb.Progress | undefined) =>
  p && (p.percent > 0 || p.bytesTotal > 0)
    ? ` ${p.percent.toFixed(0)}%${p.bytesTotal > 0 ? ` of ${bytes(p.bytesTotal)}` : ''}${p.mbps > 0 ? ` ${p.mbps.toFixed(1)} MB/s` : ''}`
    : '';

function clock(d: Date | undefined): string {
  const t = d ?? new Date();
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${p(t.getHours())}:${p(t.getMinutes())}:${p(t.getSeconds())}.${p(t.getMilliseconds(), 3)}`;
}

/** What the event says, after its kind: e.g. `CREATED volume 1b2c3d4e in image 5f6a... (domain 9c0d...)`. */
export function describePayload(payload: pb.Event['payload']): string {
  if (!payload) return '(empty event)';
  switch (payload.$case) {
    case 'domain': {
      const e = payload.domain;
      const d = e.domain;
      const space = d && d.capacityBytes > 0 ? ` free ${bytes(d.freeBytes)} of ${bytes(d.capacityBytes)}` : '';
      return `${kind(pb.domainEvent_KindToJSON(e.kind))} domain ${d?.name ?? ''} ${short(d?.id ?? '')}${space}`;
    }
    case 'volume': {
      const e = payload.volume;
      const v = e.volume;
      const state = v ? ` ${legalityName(v.legality)} gen ${v.generation}` : '';
      return `${kind(pb.volumeEvent_KindToJSON(e.kind))} volume ${short(v?.id ?? '')} image ${short(e.imageId || v?.imageId || '')} domain ${short(e.domainId)}${state}${e.operationId ? ` op ${short(e.operationId)}` : ''}`;
    }
    case 'host':
      return `${kind(pb.hostEvent_KindToJSON(payload.host.kind))} host ${payload.host.host}`;
    case 'lease': {
      const e = payload.lease;
      const mode = enumName(pb.leaseModeToJSON(e.mode), 'LEASE_MODE_').toLowerCase();
      return `${kind(pb.leaseEvent_KindToJSON(e.kind))} ${mode} lease ${shortIds(e.lease?.resource ?? '')} in ${short(e.lease?.lockspace ?? '')} host id ${e.hostId} pid ${e.holderPid}${e.operationId ? ` op ${short(e.operationId)}` : ''}${e.reason ? ` (${e.reason})` : ''}`;
    }
    case 'lockspace': {
      const e = payload.lockspace;
      return `${kind(pb.lockspaceEvent_KindToJSON(e.kind))} lockspace ${short(e.lockspace)} host id ${e.hostId}${e.reason ? ` (${e.reason})` : ''}`;
    }
    case 'operation': {
      const e = payload.operation;
      return `${statusName(e.status)} ${e.operationName}${e.step ? ` step ${shortIds(e.step)}` : ''}${e.host ? ` on ${e.host}` : ''}${progress(e.progress)}${err(e.error)}`;
    }
    case 'job': {
      const e = payload.job;
      return `${kind(pb.jobEvent_KindToJSON(e.kind))} job ${short(e.jobId)}${progress(e.progress)}${err(e.error)}`;
    }
    case 'gc': {
      const e = payload.gc;
      const what = e.relativePath ? ` ${e.itemKind} ${shortIds(e.relativePath)}${e.bytes ? ` (${bytes(e.bytes)})` : ''}` : '';
      return `${kind(pb.gcEvent_KindToJSON(e.kind))} domain ${short(e.domainId)}${what}${e.backlog ? ` backlog ${e.backlog}` : ''}`;
    }
    case 'service':
      return `${kind(pb.serviceEvent_KindToJSON(payload.service.kind))} ${payload.service.service}${payload.service.address ? ` at ${payload.service.address}` : ''}`;
    case 'diskAttachment': {
      const e = payload.diskAttachment;
      return `${kind(pb.diskAttachmentEvent_KindToJSON(e.kind))} disk ${short(e.diskId)} domain ${short(e.storageDomainId)} host ${e.host} gen ${e.generation}`;
    }
  }
}

/** One line: time, source host/service, kind, what happened. */
export function formatEvent(e: pb.Event): string {
  const source = `${e.sourceHost || '?'}/${e.sourceService || '?'}`;
  return `${clock(e.time)}  ${source.padEnd(24)} ${(e.payload?.$case ?? '-').padEnd(9)} ${describePayload(e.payload)}`;
}
