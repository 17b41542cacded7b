import {
  aborted,
  alreadyExists,
  failedPrecondition,
  hasReason,
  internal,
  invalidArgument,
  notFound,
  pb,
  Reason,
  SdmeshError,
  type CallContext,
  type EventPublisher,
  type Logger,
} from '@sdmesh/common';
import { bounded, sleep, type CallBound, type Cluster } from './cluster';
import type { DomainEntry } from './domains';
import { checkUuid, isUuid } from './ids';
import { KvConflict, type KvChange, type KvEntry, type KvStore, type KvWatch } from './kv-store';
import { knownDomain, requireActive } from './operations/operation';
import type { SchedulerMetrics } from './metrics';
import { CALL_TIMEOUT_MS } from './policies';

/**
 * Disk attachments (DiskAttachmentService; the CSI controller's ControllerPublish/Unpublish):
 * which hosts a disk is published to. One attachment per (disk, host); the attachments of one
 * disk of one domain live in one KV record (`disk.<domain id>.<disk id>` in
 * `<prefix>_attachments`), so the exclusivity rule is one compare-and-set: two publishes racing
 * for one disk cannot both win.
 *
 * The record is bookkeeping for the orchestrator; what keeps two writers apart on storage is the
 * volume lease the node's storage daemon holds. The record's one safety duty is the dead-host
 * rule: a host that does not answer keeps its attachment until sanlock calls it dead in the
 * disk's domain (its daemon may still write until then), and removing it bumps the leaf's
 * generation, which a stale publish (or a late writer checking it) then fails on. A dead host's
 * SHARED attachment while other hosts still hold the disk shared is removed without the bump (the
 * bump needs the lease exclusively, and their publish contexts carry the generation): the bump is
 * then owed (`unfencedGeneration`) and paid before the disk is next published with no live host
 * on it, so a new exclusive holder never starts at a generation a dead host was given.
 *
 * Records of the old format (`disk.<disk id>`) are moved to the new key once, when a replica
 * starts (start(): compare-and-set on revisions, so replicas doing it at once agree), and then
 * the marker key `format` ({version: 2}) says so. Until a replica has seen the marker, every call
 * also reads the old key (migration on read); after, only for a disk whose old key its watch saw
 * written again (an older replica beside it, which is not supported): that record is moved to
 * the new key at once, or, when it is newer than the disk's new-format record, calls about the
 * disk are refused until an operator settles it. Nothing an older replica writes is dropped
 * unseen (docs/scheduler.md "Disk attachments").
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
  version: typeof RECORD_VERSION;
  domainId: string;
  diskId: string;
  attachments: StoredAttachment[];
  /**
   * The generation a dead host's attachment had when it was removed without a bump (other hosts
   * kept theirs), or is being removed with one (marked before the bump). Until the leaf's
   * generation is past it, the disk is not published while no host that answers is on it.
   */
  unfencedGeneration?: number;
}

const RECORD_VERSION = 2;
const keyOf = (domainId: string, diskId: string) => `disk.${domainId}.${diskId}`;
/**
 * Records written before version 2 were keyed by the disk id alone, with no version field: a
 * disk moved to another domain (same id) met its old domain's record. Moved to the new key by the
 * one-time upgrade; read (for the domain they name) and rewritten under the new key by their next
 * change until then (migration on read).
 */
const legacyKeyOf = (diskId: string) => `disk.${diskId}`;
const LEGACY_KEY = /^disk\.([^.]+)$/;
/** The key saying that the bucket holds no record of the old format any more (the upgrade is done). */
export const FORMAT_MARKER_KEY = 'format';
/** Pause before an upgrade that could not finish (an old record unreadable, KV unreachable) is tried again. */
const UPGRADE_RETRY_MS = 30_000;
const MODE_NAMES: Record<number, StoredAttachment['mode']> = {
  [pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE]: 'exclusive',
  [pb.AttachmentMode.ATTACHMENT_MODE_SHARED]: 'shared',
};
/** CAS rounds before giving up on a record that keeps changing under us. */
const MAX_CAS_ROUNDS = 20;
/** sanlock host ids are 1..2000: no disk has more attachments than hosts. */
const MAX_ATTACHMENTS = 2000;

/** A disk's record as read: the current key's entry and, not yet migrated, the legacy key's. */
interface LoadedDisk {
  rec: StoredDisk;
  current?: KvEntry;
  legacy?: KvEntry;
  /** Where `rec` came from ('none': an empty record, nothing stored). */
  from: 'current' | 'legacy' | 'none';
}

/** Thrown inside a change when the record moved on in a way that needs the caller to start again. */
class StartAgain extends Error {}

export class DiskAttachments {
  /** The old-format keys in KV by disk id, as this replica's scan and watch saw them (the higher revision wins). */
  private readonly legacy = new Map<string, { revision: number; present: boolean }>();
  /** The upgrade marker is in KV (read or written by this replica). */
  private markerSeen = false;
  /**
   * Calls read the old key only for the disks `legacy` has: the marker is seen and `legacy` is
   * complete (the watch runs, and the scan made after it started is in). Otherwise every call does.
   */
  private upgraded = false;
  private stopped = false;
  private readonly stopSignal = new AbortController();
  private watch?: KvWatch;

  constructor(
    private readonly deps: {
      kv: KvStore;
      cluster: Cluster;
      events: EventPublisher;
      log: Logger;
      metrics?: SchedulerMetrics;
      upgradeRetryMs?: number;
    },
  ) {}

  /** Whether calls skip the old-format key (the one-time upgrade is done and followed here). */
  get upgradeDone(): boolean {
    return this.upgraded;
  }

  /**
   * Runs the one-time upgrade of old-format records, then follows the old-format keys (a watch).
   * Resolves once the first attempt ended, done or not (calls read the old key until it is).
   */
  start(): Promise<void> {
    let firstAttempt!: () => void;
    const attempted = new Promise<void>((resolve) => (firstAttempt = resolve));
    void this.follow(firstAttempt);
    return attempted;
  }

  stop(): void {
    this.stopped = true;
    this.stopSignal.abort();
    this.watch?.stop();
  }

  private async follow(firstAttempt: () => void): Promise<void> {
    const retryMs = this.deps.upgradeRetryMs ?? UPGRADE_RETRY_MS;
    while (!this.stopped) {
      try {
        this.legacy.clear();
        const watch = await this.deps.kv.watch('disk', (c) => this.legacyChanged(c));
        this.watch = watch;
        let ended = false;
        void watch.ended.then(() => (ended = true));
        // The old keys written before the watch started; later writes come through it.
        for (const [diskId, revision] of await this.legacyInKv()) this.noteLegacy(diskId, revision, true);
        while (!this.stopped && !ended) {
          await this.upgradeStep();
          this.setUpgraded(this.markerSeen && !ended);
          firstAttempt();
          if (this.markerSeen) await watch.ended;
          else await Promise.race([watch.ended, sleep(retryMs, this.stopSignal.signal).catch(() => undefined)]);
        }
        if (!this.stopped) this.deps.log.warn('KV watch of the attachment records ended; calls read old-format keys again until it is back');
      } catch (err) {
        if (!this.stopped) this.deps.log.warn({ err: String(err) }, 'attachment record upgrade or watch failed; calls read old-format keys; retrying');
      }
      this.setUpgraded(false);
      this.watch?.stop();
      firstAttempt();
      await sleep(Math.min(retryMs, 1000), this.stopSignal.signal).catch(() => undefined);
    }
  }

  private setUpgraded(done: boolean): void {
    this.upgraded = done;
    this.deps.metrics?.attachmentUpgradeDone.set(done ? 1 : 0);
  }

  /** One attempt: every old-format record moved to its new key, then the marker written. */
  private async upgradeStep(): Promise<void> {
    const { kv, log } = this.deps;
    const marker = await kv.get(FORMAT_MARKER_KEY);
    if (marker && parseFormatMarker(marker.value) !== RECORD_VERSION) {
      // Not ours to overwrite (damaged, or a later release's): keep reading the old keys.
      log.error({ key: FORMAT_MARKER_KEY, value: marker.value.slice(0, 200) }, 'attachment format marker not understood: calls keep reading old-format keys');
      return;
    }
    if (!marker) {
      let left = 0;
      for (const diskId of this.legacyPresent()) if (!(await this.migrateLegacy(diskId))) left++;
      // What KV holds now decides (the watch may not have brought our own deletes yet); one
      // written meanwhile (an older replica) is moved by the next attempt, before the marker.
      const remaining = (await this.legacyInKv()).length;
      if (left > 0 || remaining > 0) {
        log.warn({ left: Math.max(left, remaining) }, 'attachment records of the old format not all migrated: calls keep reading old-format keys; retrying');
        return;
      }
      try {
        await kv.create(FORMAT_MARKER_KEY, JSON.stringify({ version: RECORD_VERSION, upgradedMs: Date.now() }));
        log.info({ key: FORMAT_MARKER_KEY, version: RECORD_VERSION }, 'attachment records upgraded: calls no longer read old-format keys');
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
        // Another replica finished first: its marker counts if it is one this release understands.
        const theirs = await kv.get(FORMAT_MARKER_KEY);
        if (!theirs || parseFormatMarker(theirs.value) !== RECORD_VERSION) return;
      }
    }
    this.markerSeen = true;
    // Old records the watch saw meanwhile: written after the marker (an older replica), or just
    // before it after the last look. Moved now; until then calls read them.
    for (const diskId of this.legacyPresent()) {
      if (marker) this.writtenAfterUpgrade(diskId);
      await this.migrateLegacy(diskId);
    }
  }

  private legacyPresent(): string[] {
    return [...this.legacy].flatMap(([diskId, seen]) => (seen.present ? [diskId] : []));
  }

  /** The old-format keys KV holds now, with their revisions (one listing, one read per old key). */
  private async legacyInKv(): Promise<[string, number][]> {
    const out: [string, number][] = [];
    for (const key of await this.deps.kv.keys('disk')) {
      const diskId = LEGACY_KEY.exec(key)?.[1];
      const entry = diskId ? await this.deps.kv.get(key) : undefined;
      if (entry) out.push([diskId!, entry.revision]);
    }
    return out;
  }

  /** The watch saw a change of a key; an old-format record written once the marker is in is moved at once. */
  private legacyChanged(c: KvChange): void {
    const diskId = LEGACY_KEY.exec(c.key)?.[1];
    if (!diskId) return;
    const present = c.value !== undefined;
    if (!this.noteLegacy(diskId, c.revision, present) || !present || !this.markerSeen) return;
    this.writtenAfterUpgrade(diskId);
    void this.migrateLegacy(diskId);
  }

  private writtenAfterUpgrade(diskId: string): void {
    this.deps.metrics?.attachmentLegacyRecords.inc({ outcome: 'after_upgrade' });
    this.deps.log.error(
      { key: legacyKeyOf(diskId) },
      'an attachment record of the old format was written after the upgrade: a scheduler replica of an older release runs beside this one (not supported: it does not see new-format records); moving the record to the new key',
    );
  }

  private migrated(diskId: string, to: string): void {
    this.deps.metrics?.attachmentLegacyRecords.inc({ outcome: 'migrated' });
    this.deps.log.info({ from: legacyKeyOf(diskId), to }, 'attachment record of the old format moved to its new key');
  }

  /** Keeps the newer of what the scan and the watch saw of a disk's old key; false if this was older. */
  private noteLegacy(diskId: string, revision: number, present: boolean): boolean {
    const cur = this.legacy.get(diskId);
    if (cur && cur.revision >= revision) return false;
    this.legacy.set(diskId, { revision, present });
    return true;
  }

  /**
   * Moves one old-format record to its new key by compare-and-set (change(): the new key written,
   * then the old one deleted at the revision read); a leftover beside the new record is deleted.
   * False when it cannot be (unreadable, or newer than the new record): calls about the disk
   * then read it and refuse, and an operator settles it.
   */
  private async migrateLegacy(diskId: string): Promise<boolean> {
    const { kv, log, metrics } = this.deps;
    const key = legacyKeyOf(diskId);
    const seen = this.legacy.get(diskId);
    try {
      const old = await kv.get(key);
      if (old) {
        const { domainId } = parseStoredDisk(key, old.value, { diskId });
        // Written under the new key as it is (counted there); beside a new record, a leftover: deleted.
        await this.change(domainId, diskId, (rec, from) => (from === 'legacy' ? rec : undefined));
      }
      // Gone: calls stop reading it now rather than when the watch brings the delete. Only if the
      // watch brought nothing newer meanwhile (a later write has a higher revision and counts).
      if (seen && !(await kv.get(key)) && this.legacy.get(diskId) === seen) this.legacy.set(diskId, { revision: seen.revision, present: false });
      return true;
    } catch (err) {
      metrics?.attachmentLegacyRecords.inc({ outcome: 'refused' });
      log.error({ key, err: SdmeshError.from(err).message }, 'attachment record of the old format not migrated: left for an operator');
      return false;
    }
  }

  async publish(req: pb.PublishDiskRequest, call: CallBound): Promise<pb.DiskAttachment> {
    const entry = requireActive(await knownDomain(this.deps, req.storageDomainId));
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const mode = MODE_NAMES[req.mode];
    if (!mode) throw invalidArgument(`mode ${req.mode} is not EXCLUSIVE or SHARED`, Reason.INVALID_ATTACHMENT_MODE);
    const host = this.knownHost(req.host);
    if (!this.deps.cluster.hosts.reaches(host, entry.id)) {
      throw failedPrecondition(`host ${req.host} has not joined the lockspace of storage domain ${entry.id}`, Reason.HOST_CANNOT_REACH_DOMAIN);
    }
    for (let round = 0; ; round++) {
      const { rec } = await this.load(entry.id, diskId);
      // A dead host's context may carry the current generation: bump past it before anyone starts
      // on the disk with no live host beside it (a live one holds the lease and needs the
      // generation). A host asking again for its own attachment gets the same answer.
      const again = rec.attachments.some((a) => a.host === req.host);
      if (!again && this.mustPay(rec)) await this.fence(entry, diskId, rec.unfencedGeneration!, call, 'publish');
      const volumes = await this.deps.cluster.volumes(entry, diskId, call);
      const bad = volumes.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
      if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${diskId} is ILLEGAL (an unfinished data operation)`, Reason.DISK_ILLEGAL);
      const leaf = volumes[volumes.length - 1]!;
      let result: StoredAttachment | undefined;
      let created = false;
      try {
        await this.change(entry.id, diskId, (cur) => {
          const mine = cur.attachments.find((a) => a.host === req.host);
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
          const blocking = cur.attachments.find((a) => mode === 'exclusive' || a.mode === 'exclusive');
          if (blocking) {
            throw failedPrecondition(
              `disk ${diskId} is published to host ${blocking.host} (${blocking.mode}); ${mode === 'exclusive' ? 'an exclusive attachment allows one host' : 'that host has it exclusively'}`,
              Reason.ATTACHED_TO_ANOTHER_HOST,
            );
          }
          // A bump became owed after we looked (a dead host's unpublish marked it): pay it first.
          const owed = cur.unfencedGeneration;
          if (owed !== undefined && leaf.generation <= owed && this.mustPay(cur)) throw new StartAgain();
          result = { host: req.host, mode, readonly: req.readonly, createMs: Date.now(), leafVolumeId: leaf.id, generation: leaf.generation };
          created = true;
          return { ...cur, attachments: [...cur.attachments, result], unfencedGeneration: owed !== undefined && leaf.generation > owed ? undefined : owed };
        });
      } catch (err) {
        if (err instanceof StartAgain && round < 3) continue;
        if (err instanceof StartAgain) throw aborted(`the attachments of disk ${diskId} kept changing; retry`);
        throw err;
      }
      if (created) this.event(pb.DiskAttachmentEvent_Kind.KIND_PUBLISHED, entry.id, diskId, req.host, result!.generation);
      return toPublic(entry.id, diskId, result!);
    }
  }

  async unpublish(req: pb.UnpublishDiskRequest, call: CallBound): Promise<pb.UnpublishDiskResponse> {
    const entry = await knownDomain(this.deps, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const { rec } = await this.load(entry.id, diskId);
    const targets = rec.attachments.filter((a) => !req.host || a.host === req.host);
    // Hosts that answer go first: asked for every host, the last to go is then a dead one, which pays the bump at once.
    const answers = (a: StoredAttachment) => this.deps.cluster.hosts.get(a.host)?.healthy === true;
    const ordered = [...targets.filter(answers), ...targets.filter((a) => !answers(a))];
    let fencedGeneration = 0;
    for (const a of ordered) {
      const state = this.deps.cluster.hosts.get(a.host);
      if (state?.healthy) {
        await this.change(entry.id, diskId, (cur) => without(cur, a.host));
        this.event(pb.DiskAttachmentEvent_Kind.KIND_UNPUBLISHED, entry.id, diskId, a.host, a.generation);
        this.deps.log.info({ disk: diskId, host: a.host }, 'disk unpublished');
        continue;
      }
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
      // Decided in one compare-and-set: a shared attachment beside others goes now, without a bump
      // (sanlock killed what the dead host ran and freed its shared lease at host_dead; the others
      // hold the leaf shared, and the bump, which takes the lease exclusively, waits until the disk
      // is next published with no live host on it). Otherwise the bump is marked owed before it
      // runs, so a publish racing with it pays it too rather than recording the old generation.
      let outcome: 'gone' | 'dropped' | 'marked' = 'gone';
      let owed = a.generation;
      let others: string[] = [];
      await this.change(entry.id, diskId, (cur) => {
        const next = without(cur, a.host);
        outcome = !next ? 'gone' : a.mode === 'shared' && next.attachments.length > 0 ? 'dropped' : 'marked';
        owed = Math.max(cur.unfencedGeneration ?? 0, a.generation);
        others = next?.attachments.map((x) => x.host) ?? [];
        if (outcome === 'gone') return undefined;
        if (outcome === 'dropped') return { ...next!, unfencedGeneration: owed };
        return cur.unfencedGeneration === owed ? undefined : { ...cur, unfencedGeneration: owed };
      });
      if (outcome === 'gone') continue; // another unpublish took it meanwhile
      if (outcome === 'dropped') {
        this.event(pb.DiskAttachmentEvent_Kind.KIND_UNPUBLISHED, entry.id, diskId, a.host, a.generation, 'dead_shared');
        this.deps.log.info(
          { disk: diskId, host: a.host, others, unfencedGeneration: owed },
          'shared attachment of a dead host removed; the generation is bumped before the disk is next published with no live host on it',
        );
        continue;
      }
      const fenced = await this.fence(requireActive(entry), diskId, owed, call, 'unpublish');
      fencedGeneration = Math.max(fencedGeneration, fenced);
      await this.change(entry.id, diskId, (cur) => {
        const next = without(cur, a.host) ?? cur;
        // Our bump passed what was owed when we marked it; a later owed generation stays.
        const paid = next.unfencedGeneration !== undefined && next.unfencedGeneration < fenced;
        if (next === cur && !paid) return undefined;
        return { ...next, unfencedGeneration: paid ? undefined : next.unfencedGeneration };
      });
      this.event(pb.DiskAttachmentEvent_Kind.KIND_FENCED, entry.id, diskId, a.host, fenced);
      this.deps.log.info({ disk: diskId, host: a.host, fencedGeneration: fenced }, 'disk unpublished from a dead host (fenced)');
    }
    return { hosts: targets.map((a) => a.host), fencedGeneration };
  }

  async list(req: pb.ListDiskAttachmentsRequest): Promise<pb.ListDiskAttachmentsResponse> {
    if (req.storageDomainId) await knownDomain(this.deps, req.storageDomainId);
    const diskId = req.diskId ? checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID) : '';
    let records: StoredDisk[];
    if (diskId && req.storageDomainId) {
      records = [(await this.load(req.storageDomainId, diskId)).rec];
    } else {
      records = await this.scan(diskId);
    }
    const attachments = records
      .filter((r) => !req.storageDomainId || r.domainId === req.storageDomainId)
      .sort((a, b) => a.diskId.localeCompare(b.diskId) || a.domainId.localeCompare(b.domainId))
      .flatMap((r) =>
        r.attachments
          .filter((a) => !req.host || a.host === req.host)
          .sort((a, b) => a.host.localeCompare(b.host))
          .map((a) => toPublic(r.domainId, r.diskId, a)),
      );
    return { attachments };
  }

  /**
   * Every record (of one disk when `diskId` is given), legacy ones not yet migrated included. A
   * record of the asked disk that cannot be read fails the call (whether it is published must
   * not be guessed); one of another disk, in a listing of all, is left out and logged.
   */
  private async scan(diskId: string): Promise<StoredDisk[]> {
    const byDisk = new Map<string, StoredDisk>();
    const legacy: StoredDisk[] = [];
    for (const key of await this.deps.kv.keys('disk')) {
      const parts = key.split('.');
      const keyDisk = parts[parts.length - 1]!;
      if (diskId && keyDisk !== diskId) continue;
      const e = await this.deps.kv.get(key);
      if (!e) continue;
      try {
        const rec =
          parts.length === 2 ? parseStoredDisk(key, e.value, { diskId: keyDisk }) : parseStoredDisk(key, e.value, { domainId: parts[1], diskId: keyDisk });
        if (parts.length === 2) legacy.push(rec);
        else byDisk.set(keyOf(rec.domainId, rec.diskId), rec);
      } catch (err) {
        if (diskId) throw err;
        this.deps.log.error({ key, err: (err as Error).message }, 'unreadable disk attachment record left out of a listing');
      }
    }
    // A legacy record whose disk has a current record too was migrated (its delete did not happen).
    for (const rec of legacy) if (!byDisk.has(keyOf(rec.domainId, rec.diskId))) byDisk.set(keyOf(rec.domainId, rec.diskId), rec);
    return [...byDisk.values()];
  }

  /** An owed bump must be paid before a publish when no host that answers is on the disk (none holds the lease for good reason). */
  private mustPay(rec: StoredDisk): boolean {
    return rec.unfencedGeneration !== undefined && !rec.attachments.some((x) => this.deps.cluster.hosts.get(x.host)?.healthy === true);
  }

  private knownHost(name: string) {
    if (!name) throw invalidArgument('host is required', Reason.INVALID_HOST);
    const state = this.deps.cluster.hosts.get(name);
    if (!state) throw notFound(`host ${name.slice(0, 64)} is not known`, Reason.HOST_NOT_FOUND);
    return state;
  }

  /**
   * Makes the leaf's generation greater than `past` (the generation a dead host's context may
   * carry) and returns it: bumps it through metadata-tx, which takes the volume lease to do it,
   * so that succeeds only once nobody holds the lease (sanlock frees a dead host's at host_dead).
   * Already past (another replica's bump, an earlier try): nothing to do.
   */
  private async fence(entry: DomainEntry, diskId: string, past: number, call: CallBound, why: 'unpublish' | 'publish'): Promise<number> {
    const { cluster } = this.deps;
    for (let attempt = 0; ; attempt++) {
      const volumes = await cluster.volumes(entry, diskId, call);
      const leaf = volumes[volumes.length - 1]!;
      if (leaf.generation > past) return leaf.generation;
      try {
        const updated = await cluster.read([entry.id], (h) =>
          h.clients.metadata.updateVolume(
            {
              domainPath: entry.path,
              imageId: diskId,
              volumeId: leaf.id,
              generation: leaf.generation,
              bumpGeneration: true,
              operationId: `${why}-dead:${diskId}`,
            },
            bounded(call, CALL_TIMEOUT_MS.bumpGeneration),
          ),
        );
        return updated.generation;
      } catch (err) {
        // Someone else bumped it meanwhile (a second unpublish): read it again.
        if (hasReason(err, Reason.GENERATION_MISMATCH) && attempt < 3) continue;
        if (hasReason(err, Reason.VOLUME_IN_USE, Reason.LEASE_HELD)) {
          if (why === 'unpublish') {
            throw failedPrecondition(
              `the leaf of disk ${diskId} is still leased (sanlock has not freed the dead host's lease yet): retry`,
              Reason.HOST_NOT_DEAD,
            );
          }
          throw failedPrecondition(
            `disk ${diskId} is published to no host, but its leaf is still leased (a host or job holds it without an attachment): its generation must be bumped before it is published again, because a dead host's shared attachment was removed at generation ${past}; retry once the lease is free`,
            Reason.FENCE_PENDING,
          );
        }
        throw SdmeshError.from(err);
      }
    }
  }

  /**
   * The disk's record in `domainId` (empty when there is none); a legacy record counts only for
   * the domain it names. The old key is read only until the upgrade is done, then only for a disk
   * whose old key the watch saw.
   */
  private async load(domainId: string, diskId: string): Promise<LoadedDisk> {
    const readLegacy = !this.upgraded || this.legacy.get(diskId)?.present === true;
    if (readLegacy) this.deps.metrics?.attachmentLegacyReads.inc();
    const [current, old] = await Promise.all([this.deps.kv.get(keyOf(domainId, diskId)), readLegacy ? this.deps.kv.get(legacyKeyOf(diskId)) : undefined]);
    const legacyRec = old ? parseStoredDisk(legacyKeyOf(diskId), old.value, { diskId }) : undefined;
    const legacy = legacyRec?.domainId === domainId ? old : undefined;
    // After the upgrade an old record newer than the new one is an older replica's change, not a
    // leftover of a migration (that one is older): neither may be dropped or merged unseen.
    if (current && legacy && this.markerSeen && legacy.revision > current.revision) {
      throw internal(
        `disk ${diskId} has an attachment record of the old format (${legacyKeyOf(diskId)}) written after its record ${keyOf(domainId, diskId)}: a scheduler replica of an older release changed it; nothing is changed for this disk until an operator removes the wrong one from the attachments bucket`,
        Reason.ATTACHMENT_RECORD_INVALID,
      );
    }
    if (current) return { rec: parseStoredDisk(keyOf(domainId, diskId), current.value, { domainId, diskId }), current, legacy, from: 'current' };
    if (legacy) return { rec: legacyRec!, legacy, from: 'legacy' };
    return { rec: { version: RECORD_VERSION, domainId, diskId, attachments: [] }, from: 'none' };
  }

  /**
   * Applies `fn` to the disk's record by compare-and-set; `fn` returns the new record, or
   * undefined for no change. A legacy record is written under the current key first and deleted
   * after, so a crash between the two leaves both (the current one wins) and never neither.
   */
  private async change(domainId: string, diskId: string, fn: (rec: StoredDisk, from: LoadedDisk['from']) => StoredDisk | undefined): Promise<void> {
    const { kv } = this.deps;
    const key = keyOf(domainId, diskId);
    for (let round = 0; round < MAX_CAS_ROUNDS; round++) {
      const { rec, current, legacy, from } = await this.load(domainId, diskId);
      const next = fn(rec, from);
      try {
        if (next) {
          const empty = next.attachments.length === 0 && next.unfencedGeneration === undefined;
          const value = JSON.stringify({ ...next, version: RECORD_VERSION });
          if (empty) {
            if (current) await kv.delete(key, current.revision);
          } else if (current) await kv.update(key, value, current.revision);
          else {
            await kv.create(key, value);
            // Only one create of the new key succeeds: the record moved once, whoever moved it.
            if (from === 'legacy') this.migrated(diskId, key);
          }
        }
        // Migrated by this write, or a leftover of an earlier migration whose delete did not happen.
        if (legacy && (next || current)) await this.dropLegacy(diskId, legacy, current !== undefined);
        return;
      } catch (err) {
        if (!(err instanceof KvConflict)) throw err;
      }
    }
    throw aborted(`the attachments of disk ${diskId} kept changing; retry`);
  }

  /**
   * Deletes a legacy record while it is still the one read. Just migrated, a conflict means it
   * changed under us (the change runs again); a leftover beside the current record is only
   * cleaned up, by the next change if not now.
   */
  private async dropLegacy(diskId: string, legacy: KvEntry, leftover: boolean): Promise<void> {
    try {
      await this.deps.kv.delete(legacyKeyOf(diskId), legacy.revision);
    } catch (err) {
      if (!(err instanceof KvConflict) || !leftover) throw err;
    }
  }

  /** Publishes the change's event and counts it (`change`: the metric's label when it is not the kind's own). */
  private event(kind: pb.DiskAttachmentEvent_Kind, storageDomainId: string, diskId: string, host: string, generation: number, change?: string): void {
    const label =
      change ??
      { [pb.DiskAttachmentEvent_Kind.KIND_PUBLISHED]: 'published', [pb.DiskAttachmentEvent_Kind.KIND_FENCED]: 'fenced' }[kind as number] ??
      'unpublished';
    this.deps.metrics?.attachmentChanges.inc({ change: label });
    this.deps.events.publish({ $case: 'diskAttachment', diskAttachment: { kind, storageDomainId, diskId, host, generation } });
  }
}

/** The record without `host`'s attachment, or undefined when it has none. */
function without(rec: StoredDisk, host: string): StoredDisk | undefined {
  const rest = rec.attachments.filter((x) => x.host !== host);
  return rest.length === rec.attachments.length ? undefined : { ...rec, attachments: rest };
}

/**
 * A stored record, checked: KV is written by schedulers only, but a damaged or foreign value
 * must give a clear error (and change nothing), never a wrong answer. Version 2 records carry
 * `version`; legacy ones (keyed by disk id alone) have none.
 */
export function parseStoredDisk(key: string, value: string, expect: { domainId?: string; diskId: string }): StoredDisk {
  const bad = (why: string) =>
    internal(
      `the attachment record ${key} is unreadable (${why}): nothing is changed for this disk until it is repaired or removed from the attachments bucket`,
      Reason.ATTACHMENT_RECORD_INVALID,
    );
  let raw: unknown;
  try {
    raw = JSON.parse(value);
  } catch {
    throw bad('not JSON');
  }
  if (!isObject(raw)) throw bad('not an object');
  const legacy = expect.domainId === undefined;
  if (legacy ? raw.version !== undefined : raw.version !== RECORD_VERSION) throw bad(`format version ${String(raw.version)}`);
  if (typeof raw.domainId !== 'string' || !isUuid(raw.domainId)) throw bad('domainId is not a UUID');
  if (raw.diskId !== expect.diskId || (!legacy && raw.domainId !== expect.domainId)) throw bad('it names another disk than its key');
  if (!Array.isArray(raw.attachments) || raw.attachments.length > MAX_ATTACHMENTS) throw bad('attachments is not a list of at most 2000');
  const attachments = raw.attachments.map((a: unknown, i): StoredAttachment => {
    if (!isObject(a)) throw bad(`attachment ${i} is not an object`);
    const { host, mode, readonly, createMs, leafVolumeId, generation } = a;
    if (typeof host !== 'string' || host.length === 0 || host.length > 253) throw bad(`attachment ${i}: host`);
    if (mode !== 'exclusive' && mode !== 'shared') throw bad(`attachment ${i}: mode`);
    if (typeof readonly !== 'boolean') throw bad(`attachment ${i}: readonly`);
    if (typeof createMs !== 'number' || !Number.isSafeInteger(createMs) || createMs < 0) throw bad(`attachment ${i}: createMs`);
    if (typeof leafVolumeId !== 'string' || !isUuid(leafVolumeId)) throw bad(`attachment ${i}: leafVolumeId`);
    if (!isGeneration(generation)) throw bad(`attachment ${i}: generation`);
    return { host, mode, readonly, createMs, leafVolumeId, generation };
  });
  if (new Set(attachments.map((a) => a.host)).size !== attachments.length) throw bad('a host appears twice');
  if (attachments.length > 1 && attachments.some((a) => a.mode === 'exclusive')) throw bad('an exclusive attachment beside another');
  if (raw.unfencedGeneration !== undefined && !isGeneration(raw.unfencedGeneration)) throw bad('unfencedGeneration');
  return { version: RECORD_VERSION, domainId: raw.domainId, diskId: expect.diskId, attachments, unfencedGeneration: raw.unfencedGeneration };
}

/** The format version a marker value names, or undefined when it is not a marker. */
function parseFormatMarker(value: string): number | undefined {
  try {
    const raw: unknown = JSON.parse(value);
    return isObject(raw) && typeof raw.version === 'number' && Number.isSafeInteger(raw.version) ? raw.version : undefined;
  } catch {
    return undefined;
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isGeneration = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

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
