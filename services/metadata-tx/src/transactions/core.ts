/**
 * The transaction core of metadata-tx: what every transaction kind shares. Every mutating kind
 * validates its input (before touching storage), takes the domain metadata lease, opens a
 * transaction with a marker no reader lists, does its work, and commits with one rename
 * (docs/storage-format.md has the atomicity argument of each kind). This module holds:
 * - TransactionKind: a kind as data (metric name, typed params from the request, run);
 * - TransactionCore: domain opening, the domain and volume leases, fault points, metrics,
 *   free-space tracking and the Volume view of a record.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Registry } from 'prom-client';
import {
  aborted,
  ConfinedRoot,
  DomainLayout,
  type DomainMetadata,
  type EventPublisher,
  GrpcStatus,
  holdLeasesInOrder,
  ioError,
  isLeaseHeldByAnother,
  type LeaseClaim,
  leaseOffset,
  LEGALITY,
  listVolumeRecords,
  type Logger,
  newTxId,
  notFound,
  pb,
  readDomainMetadata,
  Reason,
  resourceExhausted,
  SdmeshError,
  unexpectedType,
  VOLUME_ALLOCATION,
  VOLUME_FORMAT,
  type VolumeListing,
  type VolumeRecord,
} from '@sdmesh/common';
import { FaultInjector, type FaultPause, type FaultPoint } from '../faults';
import { SharedDirSync } from '../dir-sync';
import { DomainLeaseGroups, type GroupCommitOptions, type GroupHold } from '../group-commit';
import type { DomainLeaseProvider, DomainRef } from '../leases';
import { MetadataTxMetrics } from '../metrics';
import { OperationFences } from '../operation-fences';
import { SlotIndexes, type SlotIndex } from '../slot-index';
import { appendSlotJournal } from '../slot-journal';

export interface MetadataTransactionsOptions {
  leases: DomainLeaseProvider;
  /** Where prometheus metrics go (the service's `ctx.metrics.registry`). */
  registry: Registry;
  /** Committed changes are announced here; omitted = no events. */
  events?: Pick<EventPublisher, 'publish'>;
  log?: Logger;
  /** This host's id (1..2000; 0 = unknown): recorded in transaction ids. */
  hostId?: number;
  faults?: FaultInjector;
  qemuImgBinary?: string;
  /** Free-space fraction below which a LOW_SPACE_WARNING domain event is sent (default 0.1). */
  lowSpaceWarningRatio?: number;
  /** Free bytes below which a LOW_SPACE_CRITICAL event is sent and preallocation refused (default 5 GiB). */
  lowSpaceCriticalBytes?: number;
  /** Bounds of a group commit (group-commit.ts): how many transactions share one domain lease hold. */
  groupCommit?: GroupCommitOptions;
  /** How long an operation fence is kept (operation-fences.ts; default a day). */
  fenceRetentionMs?: number;
  /** Testing only: a transaction waits at this fault point (faults.ts FaultPause). */
  faultPause?: FaultPause;
}

/**
 * One kind of metadata operation: `params` validates the request into typed parameters
 * (touching no storage), `run` does the work. `op` names it in metrics.
 */
export interface TransactionKind<Req, Params, Res> {
  op: string;
  params(req: Req): Params;
  run(tx: TransactionCore, params: Params, signal?: AbortSignal): Promise<Res>;
}

/** A domain opened for one operation: its metadata read once. */
export interface OpenDomain {
  root: string;
  /** Every file access under the domain goes through it (confined.ts). */
  dom: ConfinedRoot;
  layout: DomainLayout;
  md: DomainMetadata;
  ref: DomainRef;
}

/** Who takes a lease and until when it may be waited for. */
export interface LeaseScope {
  operationId: string;
  signal?: AbortSignal;
  /**
   * The ids a transaction creates, if it may be pipelined with others of its lease hold after
   * its serial part (GroupHold.detach; group-commit.ts); undefined: it runs alone.
   */
  overlapKeys?: readonly string[];
  /**
   * Set by kinds that keep the hold's slot index true themselves (creates) or change no slot
   * and no committed volume id (updates, marking a template). After any other kind (deletes,
   * finalize) the index is forgotten, and the next create scans again.
   */
  keepsSlotIndex?: boolean;
}

const DEFAULT_LOW_SPACE_CRITICAL_BYTES = 5 * 1024 ** 3;
const DEFAULT_LOW_SPACE_WARNING_RATIO = 0.1;

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw SdmeshError.from(signal.reason ?? new SdmeshError(GrpcStatus.CANCELLED, 'cancelled'));
}

/** Whether a name exists under the domain; something of another type than expected is refused. */
export async function exists(dom: ConfinedRoot, file: string, expected: 'file' | 'directory'): Promise<boolean> {
  const type = await dom.typeOf(file);
  if (type === 'absent') return false;
  if (type !== expected) throw unexpectedType(`${dom.relative(file)} in ${dom.root}`, type, expected);
  return true;
}

export class TransactionCore {
  readonly metrics: MetadataTxMetrics;
  readonly hostId: number;
  private readonly faults: FaultInjector;
  private readonly lowSpaceState = new Map<string, 'ok' | 'warning' | 'critical'>();
  private readonly groups: DomainLeaseGroups;
  readonly slotIndexes: SlotIndexes;
  /** The fenced operations of each domain, read once per lease hold (operation-fences.ts). */
  readonly fences = new OperationFences();
  /** fsyncs of a domain's images/ directory, shared by the creates in flight (dir-sync.ts). */
  readonly dirSync = new SharedDirSync();
  /** Each domain's metadata as last read, and the identity of the file it came from (domainMetadata). */
  private readonly metadataByRoot = new Map<string, { identity: string; md: DomainMetadata }>();

  constructor(readonly opts: MetadataTransactionsOptions) {
    this.metrics = new MetadataTxMetrics(opts.registry);
    this.slotIndexes = new SlotIndexes((how) => this.metrics.slotIndexBuilds.inc({ how }));
    this.faults = opts.faults ?? new FaultInjector();
    this.hostId = opts.hostId ?? 0;
    const onHold = opts.groupCommit?.onHold;
    this.groups = new DomainLeaseGroups(opts.leases, {
      hostId: this.hostId,
      // What the hold added to the slot index, for the next holders (slot-journal.ts).
      beforeRelease: async (domain, lease, serial) => {
        const entry = this.slotIndexes.journalEntry(domain.id, serial, lease.lver);
        if (!entry) return;
        await appendSlotJournal(domain.path, domain.id, entry).catch((err: unknown) =>
          this.opts.log?.warn({ domainId: domain.id, err: String(err) }, 'slot journal not written: the next holders scan the domain'),
        );
      },
      ...opts.groupCommit,
      onHold: (hold) => {
        this.metrics.groupSize.observe(hold.transactions);
        onHold?.(hold);
      },
    });
  }

  /** Runs one transaction kind on a request, measured (duration, failures by reason). */
  run<Req, Params, Res>(kind: TransactionKind<Req, Params, Res>, req: Req, signal?: AbortSignal): Promise<Res> {
    return this.measure(kind.op, async () => kind.run(this, kind.params(req), signal));
  }

  fault(point: FaultPoint): void {
    this.faults.hit(point);
  }

  /** Testing only: waits here while a pause is armed at this point (faults.ts FaultPause). */
  async pauseAt(point: FaultPoint): Promise<void> {
    await this.opts.faultPause?.at(point);
  }

  newTxId(): string {
    return newTxId(this.hostId);
  }

  publish(event: Parameters<EventPublisher['publish']>[0]): void {
    this.opts.events?.publish(event);
  }

  async openDomain(root: string): Promise<OpenDomain> {
    const dom = new ConfinedRoot(root);
    const layout = new DomainLayout(root);
    const md = await this.domainMetadata(dom, layout).catch((err: unknown) => {
      const e = ioError(err, `domain ${root}`);
      throw e.code === GrpcStatus.NOT_FOUND ? notFound(`${root} is not a storage domain (no dom_md/metadata)`, Reason.DOMAIN_NOT_FOUND) : e;
    });
    return { root, dom, layout, md, ref: { id: md.domainId, path: root } };
  }

  /**
   * A domain's metadata, read and verified again only when its file is another or has changed:
   * every request opens its domain, and the file is replaced whole (a new inode) or not at all.
   * The identity checked (device, inode, size, mtime, ctime: ctime cannot be set back by a
   * writer) comes from an lstat of the file beneath the root, as confined as the read.
   */
  private async domainMetadata(dom: ConfinedRoot, layout: DomainLayout): Promise<DomainMetadata> {
    const st = await dom.lstat(layout.metadataPath);
    const identity = st?.isFile() ? `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}` : undefined;
    const known = this.metadataByRoot.get(dom.root);
    if (identity && known?.identity === identity) return known.md;
    const md = await readDomainMetadata(dom.root);
    if (identity) this.metadataByRoot.set(dom.root, { identity, md });
    return md;
  }

  /** Committed records of an image; NOT_FOUND (IMAGE_NOT_FOUND) if the image is not committed. */
  async readImage(domain: OpenDomain, imageId: string): Promise<VolumeListing> {
    const imageDir = domain.layout.imageDir(imageId);
    if (!(await exists(domain.dom, imageDir, 'directory'))) throw notFound(`image ${imageId} does not exist`, Reason.IMAGE_NOT_FOUND);
    return listVolumeRecords(imageDir, { imageId, domainId: domain.md.domainId });
  }

  refuseUnreadable(listing: VolumeListing, why: string): void {
    const first = listing.unreadable[0];
    if (first) throw new SdmeshError(first.error.code, `${why}: ${first.error.message}`, first.error.reason);
  }

  reportUnreadable(listing: VolumeListing, op: string): void {
    for (const u of listing.unreadable) {
      this.metrics.failures.inc({ op, reason: u.error.reason });
      this.opts.log?.error({ file: u.file, reason: u.error.reason, err: u.error.message }, 'unreadable volume record skipped in listing');
    }
  }

  /**
   * Runs fn under the domain metadata lease (waited for), the outer level of metadata-tx's
   * leases: the volume leases a transaction needs are read under it (underVolumeLeases).
   * Transactions of this process on one domain share lease holds (group-commit.ts): fn runs
   * alone, after the previous transaction of the hold has ended, and gets the hold.
   */
  async underDomainLease<T>(domain: OpenDomain, scope: LeaseScope, fn: (hold: GroupHold) => Promise<T>): Promise<T> {
    const waitStarted = process.hrtime.bigint();
    return this.groups.run(
      domain.ref,
      scope.operationId,
      async (hold) => {
        this.metrics.leaseWait.observe(Number(process.hrtime.bigint() - waitStarted) / 1e9);
        if (hold.position === 0) this.slotIndexes.holdStarted(domain.md.domainId, domain.root, hold.lease, hold.serial);
        // A crash between two transactions of one hold: the earlier ones are committed, the later never started.
        else this.fault('group.next-transaction');
        throwIfAborted(scope.signal);
        try {
          return await fn(hold);
        } finally {
          if (!scope.keepsSlotIndex) this.slotIndexes.forget(domain.md.domainId);
          await this.refreshSpace(domain.root, domain.md).catch(() => undefined);
        }
      },
      scope.signal,
      scope.overlapKeys,
    );
  }

  /** Makes what this transaction did in the domain's images/ directory durable (an fsync that started after this call, maybe shared). */
  syncImagesDir(domain: OpenDomain): Promise<void> {
    const dir = domain.layout.imagesDir;
    return this.dirSync.sync(dir, () => domain.dom.fsyncDir(dir));
  }

  /**
   * The domain's lease slot index (slot-index.ts), valid in this hold only. Built (by a scan)
   * only when no other transaction of the hold is in flight, so the scan sees what they did.
   */
  async slotIndex(domain: OpenDomain, hold: GroupHold): Promise<SlotIndex> {
    const { domainId, maxVolumes, firstVolumeSlot } = domain.md;
    if (!this.slotIndexes.has(domainId, domain.root, hold.serial)) await hold.settled();
    return this.slotIndexes.get(domainId, domain.root, hold.serial, maxVolumes, firstVolumeSlot);
  }

  /**
   * Runs fn under these volumes' leases, exclusive and never waited for (we hold the domain
   * lease: waiting would stall every transaction of the domain), taken in the global lease
   * order. A held one → ABORTED VOLUME_IN_USE.
   */
  underVolumeLeases<T>(
    domain: OpenDomain,
    volumes: readonly Pick<VolumeRecord, 'volumeId' | 'leaseSlot'>[],
    scope: LeaseScope,
    fn: () => Promise<T>,
  ): Promise<T> {
    const claims = volumes.map(({ volumeId, leaseSlot }): LeaseClaim => ({
      lockspace: domain.ref.id,
      resource: volumeId,
      mode: 'exclusive',
      hold: async (body) => {
        try {
          await this.opts.leases.tryVolumeLease(domain.ref, volumeId, leaseSlot, scope.operationId, body, scope.signal);
        } catch (err) {
          if (isLeaseHeldByAnother(err)) {
            throw aborted(`volume ${volumeId} is in use by a running data operation: ${SdmeshError.from(err).message}`, Reason.VOLUME_IN_USE);
          }
          throw err;
        }
      },
    }));
    return holdLeasesInOrder(claims, fn);
  }

  private async measure<T>(op: string, fn: () => Promise<T>): Promise<T> {
    const end = this.metrics.duration.startTimer({ op });
    try {
      return await fn();
    } catch (err) {
      const e = ioError(err, op);
      this.metrics.failures.inc({ op, reason: e.reason });
      throw e;
    } finally {
      end();
    }
  }

  /** Statfs of the domain into the metrics; a LOW_SPACE_* event when the state gets worse. */
  async refreshSpace(root: string, md: DomainMetadata): Promise<{ capacity: number; free: number }> {
    const st = await fs.statfs(root);
    const capacity = st.blocks * st.bsize;
    const free = st.bavail * st.bsize;
    this.metrics.domainCapacity.set({ domain: md.domainId }, capacity);
    this.metrics.domainFree.set({ domain: md.domainId }, free);
    const critical = this.opts.lowSpaceCriticalBytes ?? DEFAULT_LOW_SPACE_CRITICAL_BYTES;
    const state = free < critical ? 'critical' : free < capacity * (this.opts.lowSpaceWarningRatio ?? DEFAULT_LOW_SPACE_WARNING_RATIO) ? 'warning' : 'ok';
    const previous = this.lowSpaceState.get(md.domainId) ?? 'ok';
    this.lowSpaceState.set(md.domainId, state);
    if (state !== 'ok' && state !== previous) {
      const kind = state === 'critical' ? pb.DomainEvent_Kind.KIND_LOW_SPACE_CRITICAL : pb.DomainEvent_Kind.KIND_LOW_SPACE_WARNING;
      this.publish({
        $case: 'domain',
        domain: { kind, domain: pb.StorageDomain.fromPartial({ id: md.domainId, name: md.name, path: root, capacityBytes: capacity, freeBytes: free }) },
      });
    }
    return { capacity, free };
  }

  async checkSpaceFor(domain: OpenDomain, bytes: number): Promise<void> {
    const { free } = await this.refreshSpace(domain.root, domain.md);
    const critical = this.opts.lowSpaceCriticalBytes ?? DEFAULT_LOW_SPACE_CRITICAL_BYTES;
    if (bytes > free - Math.min(critical, free)) {
      throw resourceExhausted(`preallocating ${bytes} bytes would leave less than the reserve on ${domain.root} (free ${free})`, Reason.INSUFFICIENT_SPACE);
    }
  }

  /** The API view of a record; withActualSize: look up the data file's allocation, or the bytes already known. */
  async toVolume(domain: OpenDomain, r: VolumeRecord, withActualSize: boolean | number = true): Promise<pb.Volume> {
    const dataPath = path.join(domain.layout.imageDir(r.imageId), r.volumeId);
    let actualSizeBytes = typeof withActualSize === 'number' ? withActualSize : 0;
    if (withActualSize === true) {
      const st = await domain.dom.lstat(dataPath).catch(() => undefined);
      actualSizeBytes = st?.isFile() ? st.blocks * 512 : 0;
    }
    return pb.Volume.fromPartial({
      id: r.volumeId,
      imageId: r.imageId,
      domainId: r.domainId,
      parentId: r.parentId,
      format: VOLUME_FORMAT.toPb(r.format),
      allocation: VOLUME_ALLOCATION.toPb(r.allocation),
      capacityBytes: r.capacityBytes,
      actualSizeBytes,
      legality: LEGALITY.toPb(r.legality),
      generation: r.generation,
      createTime: new Date(r.ctimeMs),
      description: r.description,
      path: dataPath,
      lease: { lockspace: r.domainId, resource: r.volumeId, path: domain.layout.leasesPath, offset: leaseOffset(r.leaseSlot) },
      template: !!r.template,
      parentImageId: r.parentImageId ?? '',
    });
  }
}
