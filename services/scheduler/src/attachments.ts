import {
  aborted,
  alreadyExists,
  failedPrecondition,
  hasReason,
  invalidArgument,
  notFound,
  pb,
  Reason,
  SdmeshError,
  type CallContext,
  type EventPublisher,
  type Logger,
} from '@sdmesh/common';
import { bounded, type CallBound, type Cluster } from './cluster';
import type { DomainEntry } from './domains';
import { checkUuid } from './ids';
import { KvConflict, type KvStore } from './kv-store';
import { knownDomain, requireActive } from './operations/operation';
import type { SchedulerMetrics } from './metrics';
import { CALL_TIMEOUT_MS } from './policies';

/**
 * Disk attachments (DiskAttachmentService; the CSI controller's ControllerPublish/Unpublish):
 * which hosts a disk is published to. One KV record per disk (`disk.<disk id>` in
 * `<prefix>_attachments`) holding all its attachments, so the exclusivity rule is one
 * compare-and-set: two publishes racing for one disk cannot both win.
 *
 * The record is bookkeeping for the orchestrator; what keeps two writers apart on storage is the
 * volume lease the node's storage daemon holds. The record's one safety duty is the dead-host
 * rule: a host that does not answer keeps its attachment until sanlock calls it dead in the
 * disk's domain (its daemon may still write until then), and removing it bumps the leaf's
 * generation, which a stale publish (or a late writer checking it) then fails on.
 */
interface StoredAttachment {
  host: string;
  mode: 'exclusive' | 'shared';
  readonly: boolean;
  createMs: number;
  leafVolumeId: string;
  generation: number;
}

interface StoredDisk {
  domainId: string;
  diskId: string;
  attachments: StoredAttachment[];
}

const keyOf = (diskId: string) => `disk.${diskId}`;
const MODE_NAMES: Record<number, StoredAttachment['mode']> = {
  [pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE]: 'exclusive',
  [pb.AttachmentMode.ATTACHMENT_MODE_SHARED]: 'shared',
};
/** CAS rounds before giving up on a record that keeps changing under us. */
const MAX_CAS_ROUNDS = 20;

export class DiskAttachments {
  constructor(
    private readonly deps: {
      kv: KvStore;
      cluster: Cluster;
      events: EventPublisher;
      log: Logger;
      metrics?: SchedulerMetrics;
    },
  ) {}

  async publish(req: pb.PublishDiskRequest, call: CallBound): Promise<pb.DiskAttachment> {
    const entry = requireActive(await knownDomain(this.deps, req.storageDomainId));
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const mode = MODE_NAMES[req.mode];
    if (!mode) throw invalidArgument(`mode ${req.mode} is not EXCLUSIVE or SHARED`, Reason.INVALID_ATTACHMENT_MODE);
    const host = this.knownHost(req.host);
    if (!this.deps.cluster.hosts.reaches(host, entry.id)) {
      throw failedPrecondition(`host ${req.host} has not joined the lockspace of storage domain ${entry.id}`, Reason.HOST_CANNOT_REACH_DOMAIN);
    }
    const volumes = await this.deps.cluster.volumes(entry, diskId, call);
    const bad = volumes.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
    if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${diskId} is ILLEGAL (an unfinished data operation)`, Reason.DISK_ILLEGAL);
    const leaf = volumes[volumes.length - 1]!;
    let result: StoredAttachment | undefined;
    let created = false;
    await this.change(entry.id, diskId, (rec) => {
      const mine = rec.attachments.find((a) => a.host === req.host);
      if (mine) {
        if (mine.mode !== mode || mine.readonly !== req.readonly) {
          throw alreadyExists(
            `disk ${diskId} is already published to ${req.host} (${mine.mode}${mine.readonly ? ', read-only' : ''}), not as asked (${mode}${req.readonly ? ', read-only' : ''})`,
            Reason.ATTACHMENT_MISMATCH,
          );
        }
        result = mine;
        return undefined;
      }
      const blocking = rec.attachments.find((a) => mode === 'exclusive' || a.mode === 'exclusive');
      if (blocking) {
        throw failedPrecondition(
          `disk ${diskId} is published to host ${blocking.host} (${blocking.mode}); ${mode === 'exclusive' ? 'an exclusive attachment allows one host' : 'that host has it exclusively'}`,
          Reason.ATTACHED_TO_ANOTHER_HOST,
        );
      }
      result = { host: req.host, mode, readonly: req.readonly, createMs: Date.now(), leafVolumeId: leaf.id, generation: leaf.generation };
      created = true;
      return { ...rec, attachments: [...rec.attachments, result] };
    });
    if (created) this.event(pb.DiskAttachmentEvent_Kind.KIND_PUBLISHED, entry.id, diskId, req.host, result!.generation);
    return toPublic(entry.id, diskId, result!);
  }

  async unpublish(req: pb.UnpublishDiskRequest, call: CallBound): Promise<pb.UnpublishDiskResponse> {
    const entry = await knownDomain(this.deps, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const rec = await this.read(diskId);
    const targets = (rec?.attachments ?? []).filter((a) => !req.host || a.host === req.host);
    let fencedGeneration = 0;
    for (const a of targets) {
      /** The generation this host's attachment was fenced at (0: it answers, no fence). */
      let fenced = 0;
      const state = this.deps.cluster.hosts.get(a.host);
      if (!state?.healthy) {
        // The host does not answer: what it runs may still write until sanlock says it is dead.
        const liveness = state?.liveness.get(entry.id);
        const dead = liveness === pb.HostLiveness.HOST_LIVENESS_DEAD || liveness === pb.HostLiveness.HOST_LIVENESS_FREE || !state;
        if (!dead) {
          this.deps.metrics?.attachmentChanges.inc({ change: 'refused_not_dead' });
          throw failedPrecondition(
            `host ${a.host} does not answer and sanlock calls it ${livenessName(liveness)} in storage domain ${entry.id}, not dead: disk ${diskId} stays published to it until sanlock declares the host dead`,
            Reason.HOST_NOT_DEAD,
          );
        }
        fenced = await this.fence(requireActive(entry), diskId, call);
        fencedGeneration = Math.max(fencedGeneration, fenced);
      }
      await this.change(entry.id, diskId, (cur) => {
        const rest = cur.attachments.filter((x) => x.host !== a.host);
        return rest.length === cur.attachments.length ? undefined : { ...cur, attachments: rest };
      });
      this.event(
        fenced ? pb.DiskAttachmentEvent_Kind.KIND_FENCED : pb.DiskAttachmentEvent_Kind.KIND_UNPUBLISHED,
        entry.id,
        diskId,
        a.host,
        fenced || a.generation,
      );
      this.deps.log.info({ disk: diskId, host: a.host, fencedGeneration: fenced }, fenced ? 'disk unpublished from a dead host (fenced)' : 'disk unpublished');
    }
    return { hosts: targets.map((a) => a.host), fencedGeneration };
  }

  async list(req: pb.ListDiskAttachmentsRequest): Promise<pb.ListDiskAttachmentsResponse> {
    if (req.storageDomainId) await knownDomain(this.deps, req.storageDomainId);
    let records: StoredDisk[];
    if (req.diskId) {
      const rec = await this.read(checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID));
      records = rec ? [rec] : [];
    } else {
      const keys = await this.deps.kv.keys('disk');
      records = (await Promise.all(keys.map((k) => this.read(k.slice('disk.'.length))))).filter((r): r is StoredDisk => r !== undefined);
    }
    const attachments = records
      .filter((r) => !req.storageDomainId || r.domainId === req.storageDomainId)
      .sort((a, b) => a.diskId.localeCompare(b.diskId))
      .flatMap((r) =>
        r.attachments
          .filter((a) => !req.host || a.host === req.host)
          .sort((a, b) => a.host.localeCompare(b.host))
          .map((a) => toPublic(r.domainId, r.diskId, a)),
      );
    return { attachments };
  }

  private knownHost(name: string) {
    if (!name) throw invalidArgument('host is required', Reason.INVALID_HOST);
    const state = this.deps.cluster.hosts.get(name);
    if (!state) throw notFound(`host ${name.slice(0, 64)} is not known`, Reason.HOST_NOT_FOUND);
    return state;
  }

  /**
   * Bumps the leaf's generation through metadata-tx, which takes the volume lease to do it: that
   * succeeds only once the dead host's lease is free (sanlock frees it at host_dead).
   */
  private async fence(entry: DomainEntry, diskId: string, call: CallBound): Promise<number> {
    const { cluster } = this.deps;
    for (let attempt = 0; ; attempt++) {
      const volumes = await cluster.volumes(entry, diskId, call);
      const leaf = volumes[volumes.length - 1]!;
      try {
        const updated = await cluster.read([entry.id], (h) =>
          h.clients.metadata.updateVolume(
            {
              domainPath: entry.path,
              imageId: diskId,
              volumeId: leaf.id,
              generation: leaf.generation,
              bumpGeneration: true,
              operationId: `unpublish-dead:${diskId}`,
            },
            bounded(call, CALL_TIMEOUT_MS.bumpGeneration),
          ),
        );
        return updated.generation;
      } catch (err) {
        // Someone else bumped it meanwhile (a second unpublish): read it again.
        if (hasReason(err, Reason.GENERATION_MISMATCH) && attempt < 3) continue;
        if (hasReason(err, Reason.VOLUME_IN_USE, Reason.LEASE_HELD)) {
          throw failedPrecondition(`the leaf of disk ${diskId} is still leased (sanlock has not freed the dead host's lease yet): retry`, Reason.HOST_NOT_DEAD);
        }
        throw SdmeshError.from(err);
      }
    }
  }

  private async read(diskId: string): Promise<StoredDisk | undefined> {
    const e = await this.deps.kv.get(keyOf(diskId));
    return e ? (JSON.parse(e.value) as StoredDisk) : undefined;
  }

  /** Applies `fn` to the disk's record by compare-and-set; `fn` returns the new record, or undefined for no change. */
  private async change(domainId: string, diskId: string, fn: (rec: StoredDisk) => StoredDisk | undefined): Promise<void> {
    const { kv } = this.deps;
    for (let round = 0; round < MAX_CAS_ROUNDS; round++) {
      const e = await kv.get(keyOf(diskId));
      const cur: StoredDisk = e ? (JSON.parse(e.value) as StoredDisk) : { domainId, diskId, attachments: [] };
      const next = fn(cur);
      if (!next) return;
      try {
        if (next.attachments.length === 0) await kv.delete(keyOf(diskId), e?.revision);
        else if (e) await kv.update(keyOf(diskId), JSON.stringify(next), e.revision);
        else await kv.create(keyOf(diskId), JSON.stringify(next));
        return;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
    throw aborted(`the attachments of disk ${diskId} kept changing; retry`);
  }

  private event(kind: pb.DiskAttachmentEvent_Kind, storageDomainId: string, diskId: string, host: string, generation: number): void {
    const change =
      { [pb.DiskAttachmentEvent_Kind.KIND_PUBLISHED]: 'published', [pb.DiskAttachmentEvent_Kind.KIND_FENCED]: 'fenced' }[kind as number] ?? 'unpublished';
    this.deps.metrics?.attachmentChanges.inc({ change });
    this.deps.events.publish({ $case: 'diskAttachment', diskAttachment: { kind, storageDomainId, diskId, host, generation } });
  }
}

function toPublic(domainId: string, diskId: string, a: StoredAttachment): pb.DiskAttachment {
  return pb.DiskAttachment.fromPartial({
    storageDomainId: domainId,
    diskId,
    host: a.host,
    mode: a.mode === 'exclusive' ? pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE : pb.AttachmentMode.ATTACHMENT_MODE_SHARED,
    readonly: a.readonly,
    createTime: new Date(a.createMs),
    leafVolumeId: a.leafVolumeId,
    generation: a.generation,
  });
}

const livenessName = (l: pb.HostLiveness | undefined) => (l === undefined ? 'unknown' : pb.hostLivenessToJSON(l).replace('HOST_LIVENESS_', '').toLowerCase());

/** The attachment service's handlers, bound to the incoming call's deadline and signal. */
export function attachmentHandlers(attachments: DiskAttachments, callOf: (ctx: CallContext) => CallBound) {
  return {
    publishDisk: (req: pb.PublishDiskRequest, ctx: CallContext) => attachments.publish(req, callOf(ctx)),
    unpublishDisk: (req: pb.UnpublishDiskRequest, ctx: CallContext) => attachments.unpublish(req, callOf(ctx)),
    listDiskAttachments: (req: pb.ListDiskAttachmentsRequest) => attachments.list(req),
  };
}
