import fs from 'node:fs/promises';
import path from 'node:path';
import type { Registry } from 'prom-client';
import {
  aborted,
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  pb,
  resourceExhausted,
  SdmeshError,
  GrpcStatus,
  type EventPublisher,
  type Logger,
} from '@sdmesh/common';
import { FaultInjector, type FaultPoint } from './faults';
import type { DomainLeaseProvider, DomainRef } from './leases';
import { MetadataTxMetrics } from './metrics';
import { qemuImgInfo } from './qemu';
import {
  checkQcow2Header,
  classifyVolumeEntry,
  ConfinedRoot,
  FIRST_CHILD_FD,
  runQemuImgWithFds,
  unexpectedType,
  DEFAULT_IO_TIMEOUT_SECONDS,
  DEFAULT_MAX_VOLUMES,
  deletedVolumeDataName,
  deletedVolumeMetaName,
  DomainLayout,
  encodeDomainMetadata,
  encodeVolumeRecord,
  FIRST_VOLUME_SLOT,
  ioError,
  LEASE_SLOT_SIZE,
  leaseOffset,
  listCommittedImageIds,
  listVolumeRecords,
  lowestFreeSlot,
  MAX_MAX_VOLUMES,
  orderChain,
  readDomainMetadata,
  readVolumeRecord,
  scanLeaseSlots,
  TX_INFIX,
  FORMAT_VERSION,
  newTxId,
  validateCapacity,
  validateDescription,
  validateDomainName,
  validateDomainPath,
  validateId,
  volumeMetaName,
  volumeMetaTxName,
  type DomainMetadata,
  type VolumeAllocationName,
  type VolumeFormatName,
  type VolumeListing,
  type VolumeRecord,
} from '@sdmesh/common';

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
}

/** A volume record before its lease slot is chosen. */
type PendingRecord = Omit<VolumeRecord, 'leaseSlot'>;
type Prepared = { pending: PendingRecord; parentFormat?: VolumeFormatName } | { committed: VolumeRecord };

interface OpenDomain {
  root: string;
  /** Every file access under the domain goes through it (confined.ts). */
  dom: ConfinedRoot;
  layout: DomainLayout;
  md: DomainMetadata;
  ref: DomainRef;
}

const MAX_IO_TIMEOUT_SECONDS = 60;

const FORMAT_NAMES: Partial<Record<pb.VolumeFormat, VolumeFormatName>> = {
  [pb.VolumeFormat.VOLUME_FORMAT_RAW]: 'RAW',
  [pb.VolumeFormat.VOLUME_FORMAT_QCOW2]: 'QCOW2',
};
const ALLOCATION_NAMES: Partial<Record<pb.VolumeAllocation, VolumeAllocationName>> = {
  [pb.VolumeAllocation.VOLUME_ALLOCATION_UNSPECIFIED]: 'SPARSE',
  [pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE]: 'SPARSE',
  [pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED]: 'PREALLOCATED',
};

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw SdmeshError.from(signal.reason ?? new SdmeshError(GrpcStatus.CANCELLED, 'cancelled'));
}

/** Whether a name exists under the domain; something of another type than expected is refused. */
async function exists(dom: ConfinedRoot, file: string, expected: 'file' | 'directory'): Promise<boolean> {
  const type = await dom.typeOf(file);
  if (type === 'absent') return false;
  if (type !== expected) throw unexpectedType(`${dom.relative(file)} in ${dom.root}`, type, expected);
  return true;
}

/**
 * The storage-transaction engine of metadata-tx. Every mutating operation:
 * validates its input (before touching storage), takes the domain metadata lease, opens a
 * transaction with a marker no reader lists, does its work, and commits with one rename.
 * See docs/storage-format.md for the atomicity argument of each operation.
 */
export class MetadataTransactions {
  readonly metrics: MetadataTxMetrics;
  private readonly faults: FaultInjector;
  private readonly hostId: number;
  private readonly lowSpaceState = new Map<string, 'ok' | 'warning' | 'critical'>();

  constructor(private readonly opts: MetadataTransactionsOptions) {
    this.metrics = new MetadataTxMetrics(opts.registry);
    this.faults = opts.faults ?? new FaultInjector();
    this.hostId = opts.hostId ?? 0;
  }

  // -------------------------------------------------------------------------------------
  // Domain

  async formatDomain(req: pb.FormatDomainRequest): Promise<pb.StorageDomain> {
    return this.measure('format', async () => {
      const root = validateDomainPath(req.path);
      const domainId = validateId('domain id', req.domainId);
      const name = validateDomainName(req.name);
      const maxVolumes = req.maxVolumes || DEFAULT_MAX_VOLUMES;
      if (!Number.isInteger(maxVolumes) || maxVolumes < 1 || maxVolumes > MAX_MAX_VOLUMES) {
        throw invalidArgument(`max_volumes ${maxVolumes} is out of range 1..${MAX_MAX_VOLUMES}`, 'INVALID_MAX_VOLUMES');
      }
      const ioTimeoutSeconds = req.ioTimeoutSeconds || DEFAULT_IO_TIMEOUT_SECONDS;
      if (!Number.isInteger(ioTimeoutSeconds) || ioTimeoutSeconds < 1 || ioTimeoutSeconds > MAX_IO_TIMEOUT_SECONDS) {
        throw invalidArgument(`io_timeout_seconds ${ioTimeoutSeconds} is out of range 1..${MAX_IO_TIMEOUT_SECONDS}`, 'INVALID_IO_TIMEOUT');
      }
      const layout = new DomainLayout(root);

      // An existing domain: the same one again is a retry (idempotent), anything else is refused.
      const existing = await readDomainMetadata(root).catch((err: unknown) => SdmeshError.from(err));
      if (!(existing instanceof SdmeshError)) {
        if (existing.domainId === domainId) return this.getDomain({ path: root });
        throw alreadyExists(`${root} is already storage domain ${existing.domainId}`, 'DOMAIN_EXISTS');
      }
      if (existing.code !== GrpcStatus.NOT_FOUND) {
        throw failedPrecondition(`${root} has unreadable domain metadata (${existing.message}); refusing to format over it`, 'DOMAIN_NOT_EMPTY');
      }
      await this.checkFormatTarget(root);

      await fs.mkdir(root, { recursive: true, mode: 0o770 });
      const dom = new ConfinedRoot(root);
      await dom.setDirectoryOwnership(root);
      if (!(await exists(dom, layout.domMdDir, 'directory'))) await dom.mkdir(layout.domMdDir);
      if (!(await exists(dom, layout.imagesDir, 'directory'))) await dom.mkdir(layout.imagesDir);
      await dom.fsyncDir(root);
      await new ConfinedRoot(path.dirname(root)).fsyncDir(path.dirname(root));
      this.fault('format.after-dirs');

      const ref = { id: domainId, path: root };
      await this.opts.leases.formatDomainLeases(ref, ioTimeoutSeconds);
      this.fault('format.after-leases');

      const md: DomainMetadata = {
        domainId,
        name,
        ctimeMs: Date.now(),
        maxVolumes,
        ioTimeoutSeconds,
        leaseSlotSize: LEASE_SLOT_SIZE,
        firstVolumeSlot: FIRST_VOLUME_SLOT,
      };
      // Commit: link(2) the temp file to dom_md/metadata. It fails if another formatter
      // committed first, so at most one format of a directory ever wins.
      await dom.writeFileAtomic(layout.metadataPath, encodeDomainMetadata(md), {
        tempSuffix: TX_INFIX + newTxId(this.hostId),
        noReplace: true,
        beforeCommit: () => this.fault('format.before-commit'),
      }).catch((err: unknown) => {
        const e = ioError(err, `domain metadata ${layout.metadataPath}`);
        throw e.code === GrpcStatus.ALREADY_EXISTS ? alreadyExists(`${root} was formatted concurrently by another request`, 'DOMAIN_EXISTS') : e;
      });
      this.fault('format.after-metadata');

      const domain = await this.getDomain({ path: root });
      this.opts.events?.publish({ $case: 'domain', domain: { kind: pb.DomainEvent_Kind.KIND_FORMATTED, domain } });
      this.opts.log?.info({ domainId, path: root }, 'storage domain formatted');
      return domain;
    });
  }

  /** A format target must be absent, empty, or the leftovers of an interrupted format. */
  private async checkFormatTarget(root: string): Promise<void> {
    const dom = new ConfinedRoot(root);
    let entries: string[];
    try {
      const listing = await dom.list(root, ['file', 'directory', 'symlink', 'fifo', 'socket', 'block-device', 'char-device', 'unknown']);
      entries = listing.entries.map((e) => e.name);
    } catch (err) {
      const e = ioError(err, `domain directory ${root}`);
      if (e.code === GrpcStatus.NOT_FOUND) return;
      throw e;
    }
    const layout = new DomainLayout(root);
    const refuse = (what: string) => failedPrecondition(`${root} is not empty (${what}); refusing to format it`, 'DOMAIN_NOT_EMPTY');
    for (const entry of entries) {
      if (entry === 'lost+found') continue; // the root of a freshly made file system
      if (entry === 'images') {
        if (!(await exists(dom, layout.imagesDir, 'directory'))) throw refuse('images is not a directory');
        if ((await dom.list(layout.imagesDir, [])).skipped.length > 0) throw refuse('images/ has entries');
      } else if (entry === 'dom_md') {
        if (!(await exists(dom, layout.domMdDir, 'directory'))) throw refuse('dom_md is not a directory');
        const listing = await dom.list(layout.domMdDir, ['file']);
        const leftovers = [
          ...listing.entries.map((e) => e.name).filter((n) => n !== 'ids' && n !== 'leases' && !n.startsWith('metadata' + TX_INFIX)),
          ...listing.skipped.map((x) => `${x.name} (${x.type})`),
        ];
        if (leftovers.length > 0) throw refuse(`dom_md/ has ${leftovers.join(', ')}`);
      } else {
        throw refuse(`found ${entry}`);
      }
    }
  }

  /** A domain's metadata, space and counts. Unreadable metadata gives status INVALID, not an error. */
  async getDomain(req: pb.GetDomainRequest): Promise<pb.StorageDomain> {
    const root = validateDomainPath(req.path);
    let md: DomainMetadata;
    try {
      md = await readDomainMetadata(root);
    } catch (err) {
      const e = ioError(err, `domain ${root}`);
      if (e.code === GrpcStatus.NOT_FOUND) throw notFound(`${root} is not a storage domain (no dom_md/metadata)`, 'DOMAIN_NOT_FOUND');
      const status = e.code === GrpcStatus.UNAVAILABLE ? pb.DomainStatus.DOMAIN_STATUS_UNREACHABLE : pb.DomainStatus.DOMAIN_STATUS_INVALID;
      return pb.StorageDomain.fromPartial({ path: root, status, statusMessage: e.message });
    }
    const imageIds = await listCommittedImageIds(root);
    let volumeCount = 0;
    for (const imageId of imageIds) {
      const listing = await listVolumeRecords(new DomainLayout(root).imageDir(imageId), { imageId, domainId: md.domainId });
      volumeCount += listing.records.length + listing.unreadable.length;
    }
    const space = await this.refreshSpace(root, md);
    return pb.StorageDomain.fromPartial({
      id: md.domainId,
      name: md.name,
      path: root,
      status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE,
      capacityBytes: space.capacity,
      freeBytes: space.free,
      volumeCount,
      imageCount: imageIds.length,
      formatVersion: FORMAT_VERSION,
      createTime: new Date(md.ctimeMs),
    });
  }

  // -------------------------------------------------------------------------------------
  // Create

  async createVolume(req: pb.CreateVolumeRequest, signal?: AbortSignal): Promise<pb.Volume> {
    return this.measure('create', async () => {
      const root = validateDomainPath(req.domainPath);
      const imageId = validateId('image id', req.imageId);
      const volumeId = validateId('volume id', req.volumeId);
      const parentId = req.parentId ? validateId('parent id', req.parentId) : '';
      const isSnapshot = parentId !== '';
      const format: VolumeFormatName | undefined =
        req.format === pb.VolumeFormat.VOLUME_FORMAT_UNSPECIFIED ? (isSnapshot ? 'QCOW2' : 'RAW') : FORMAT_NAMES[req.format];
      if (!format) throw invalidArgument(`unknown volume format ${req.format}`, 'INVALID_FORMAT');
      if (isSnapshot && format !== 'QCOW2') throw invalidArgument('a snapshot volume must be qcow2', 'INVALID_FORMAT');
      const allocation = ALLOCATION_NAMES[req.allocation];
      if (!allocation) throw invalidArgument(`unknown allocation ${req.allocation}`, 'INVALID_ALLOCATION');
      if (isSnapshot && allocation === 'PREALLOCATED') throw invalidArgument('a snapshot volume is always sparse', 'INVALID_ALLOCATION');
      if (!isSnapshot) validateCapacity(req.capacityBytes);
      if (parentId === volumeId) throw invalidArgument('a volume cannot be its own parent', 'INVALID_ID');
      const description = validateDescription(req.description);
      const domain = await this.openDomain(root);

      return this.underDomainLease(domain, req.operationId, signal, async () => {
        const base = { volumeId, imageId, domainId: domain.md.domainId, description, generation: 0, ctimeMs: Date.now() };
        const legality = req.initiallyIllegal ? 'ILLEGAL' : 'LEGAL';
        const prepared = isSnapshot
          ? await this.prepareSnapshot(domain, { ...base, parentId, legality })
          : await this.prepareNewImage(domain, { ...base, parentId: '', format, allocation, capacityBytes: req.capacityBytes, legality });
        if ('committed' in prepared) return this.toVolume(domain, prepared.committed);

        const scan = await scanLeaseSlots(root);
        const owner = scan.committedVolumeIds.get(volumeId);
        if (owner) throw alreadyExists(`volume ${volumeId} already exists in image ${owner.imageId}`, 'VOLUME_EXISTS');
        const full: VolumeRecord = { ...prepared.pending, leaseSlot: lowestFreeSlot(scan.usedSlots, domain.md.maxVolumes, domain.md.firstVolumeSlot) };
        if (full.allocation === 'PREALLOCATED') await this.checkSpaceFor(domain, full.capacityBytes);

        const txid = newTxId(this.hostId);
        const committed = isSnapshot
          ? await this.commitSnapshot(domain, full, prepared.parentFormat ?? 'RAW', txid, signal)
          : await this.commitNewImage(domain, full, txid, signal);
        const volume = await this.toVolume(domain, committed);
        this.opts.events?.publish({
          $case: 'volume',
          volume: { kind: pb.VolumeEvent_Kind.KIND_CREATED, volume, domainId: domain.md.domainId, imageId, operationId: req.operationId },
        });
        this.opts.log?.info({ txid, domainId: domain.md.domainId, imageId, volumeId, slot: full.leaseSlot, operationId: req.operationId }, 'volume created');
        return volume;
      });
    });
  }

  /**
   * Checks for a new image. A committed image with this id is either a retry of the same
   * request (return the committed volume) or a conflict.
   */
  private async prepareNewImage(
    domain: OpenDomain,
    pending: PendingRecord,
  ): Promise<Prepared> {
    const imageDir = domain.layout.imageDir(pending.imageId);
    if (await exists(domain.dom, imageDir, 'directory')) {
      const listing = await listVolumeRecords(imageDir, { imageId: pending.imageId, domainId: domain.md.domainId });
      const same = listing.records.find((r) => r.volumeId === pending.volumeId);
      if (same && sameShape(same, pending)) return { committed: same };
      throw alreadyExists(`image ${pending.imageId} already exists`, 'IMAGE_EXISTS');
    }
    return { pending };
  }

  /** Checks for a snapshot: the image exists, the parent is its LEGAL leaf. */
  private async prepareSnapshot(
    domain: OpenDomain,
    partial: Omit<PendingRecord, 'format' | 'allocation' | 'capacityBytes'>,
  ): Promise<Prepared> {
    const listing = await this.readImage(domain, partial.imageId);
    const pending: PendingRecord = { ...partial, format: 'QCOW2', allocation: 'SPARSE', capacityBytes: 0 };
    const parent = listing.records.find((r) => r.volumeId === partial.parentId);
    const same = listing.records.find((r) => r.volumeId === partial.volumeId);
    if (same) {
      if (parent && sameShape(same, { ...pending, capacityBytes: parent.capacityBytes })) return { committed: same };
      throw alreadyExists(`volume ${partial.volumeId} already exists in image ${partial.imageId}`, 'VOLUME_EXISTS');
    }
    this.refuseUnreadable(listing, 'cannot prove the parent is the leaf');
    if (!parent) throw notFound(`parent volume ${partial.parentId} is not in image ${partial.imageId}`, 'PARENT_NOT_FOUND');
    if (listing.records.some((r) => r.parentId === parent.volumeId)) {
      throw failedPrecondition(`parent volume ${parent.volumeId} is not the leaf of image ${partial.imageId}`, 'PARENT_NOT_LEAF');
    }
    if (parent.legality !== 'LEGAL') throw failedPrecondition(`parent volume ${parent.volumeId} is ILLEGAL`, 'PARENT_ILLEGAL');
    return { pending: { ...pending, capacityBytes: parent.capacityBytes }, parentFormat: parent.format };
  }

  /**
   * New image: mkdir images/_tx_<txid>_<img> (the marker), write <vol>.meta, format the lease,
   * create the data, fsync, then commit with one rename of the directory to images/<img>.
   */
  private async commitNewImage(domain: OpenDomain, record: VolumeRecord, txid: string, signal?: AbortSignal): Promise<VolumeRecord> {
    const { layout } = domain;
    const txDir = layout.txImageDir(txid, record.imageId);
    const dataPath = path.join(txDir, record.volumeId);
    let committed = false;
    try {
      await domain.dom.mkdir(txDir);
      await domain.dom.fsyncDir(layout.imagesDir);
      this.fault('create.after-marker');
      await domain.dom.writeFileAtomic(path.join(txDir, volumeMetaName(record.volumeId)), encodeVolumeRecord(record), { tempSuffix: TX_INFIX + txid });
      this.fault('create.after-meta');
      await this.opts.leases.formatLeaseSlot(domain.ref, record.volumeId, record.leaseSlot);
      this.fault('create.after-lease');
      throwIfAborted(signal);
      await this.createData(domain.dom, dataPath, record, signal);
      this.fault('create.after-data');
      await domain.dom.fsyncDir(txDir);
      throwIfAborted(signal);
      this.fault('create.before-commit');
      await domain.dom.rename(txDir, layout.imageDir(record.imageId));
      committed = true;
      await domain.dom.fsyncDir(layout.imagesDir);
      this.fault('create.after-commit');
      return record;
    } catch (err) {
      // Not committed: nothing is visible. Remove what we made now rather than leave it for
      // the GC (safe: we still hold the domain lease, and no one can use an uncommitted slot).
      if (!committed) await this.removeOwnTxDir(domain.dom, txDir).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Snapshot: write <vol>.meta.tx-<txid> (the marker, which is also the record), format the
   * lease, qemu-img create the qcow2 overlay, fsync, then commit with one rename to <vol>.meta.
   */
  private async commitSnapshot(domain: OpenDomain, record: VolumeRecord, parentFormat: VolumeFormatName, txid: string, signal?: AbortSignal): Promise<VolumeRecord> {
    const imageDir = domain.layout.imageDir(record.imageId);
    await this.removeUncommittedLeftovers(domain.dom, imageDir, record.volumeId);
    const marker = path.join(imageDir, volumeMetaTxName(record.volumeId, txid));
    const dataPath = path.join(imageDir, record.volumeId);
    let committed = false;
    try {
      const handle = await domain.dom.createFile(marker, 'record');
      try {
        await handle.writeFile(encodeVolumeRecord(record));
        await handle.sync();
      } finally {
        await handle.close();
      }
      await domain.dom.fsyncDir(imageDir);
      this.fault('create.after-marker');
      this.fault('create.after-meta');
      await this.opts.leases.formatLeaseSlot(domain.ref, record.volumeId, record.leaseSlot);
      this.fault('create.after-lease');
      throwIfAborted(signal);
      await this.createData(domain.dom, dataPath, record, signal, parentFormat);
      this.fault('create.after-data');
      await domain.dom.fsyncDir(imageDir);
      throwIfAborted(signal);
      this.fault('create.before-commit');
      await domain.dom.rename(marker, path.join(imageDir, volumeMetaName(record.volumeId)));
      committed = true;
      await domain.dom.fsyncDir(imageDir);
      this.fault('create.after-commit');
      return record;
    } catch (err) {
      if (!committed) {
        await domain.dom.unlink(marker).catch(() => undefined);
        if ((await domain.dom.typeOf(dataPath).catch(() => 'absent')) === 'file') await domain.dom.unlink(dataPath).catch(() => undefined);
      }
      throw err;
    }
  }

  /**
   * Before re-creating a volume id in an existing image, remove what an interrupted attempt
   * left: its data file (no committed .meta) and its .meta.tx-* markers. Under the domain lease
   * no transaction is in flight, so these are garbage by definition.
   */
  private async removeUncommittedLeftovers(dom: ConfinedRoot, imageDir: string, volumeId: string): Promise<void> {
    let removed = false;
    for (const name of await dom.listNames(imageDir, ['file'])) {
      const entry = classifyVolumeEntry(name);
      if (entry.kind === 'meta-tx' && entry.volumeId === volumeId) {
        await dom.unlink(path.join(imageDir, name));
        removed = true;
      }
    }
    if (!(await exists(dom, path.join(imageDir, volumeMetaName(volumeId)), 'file')) && (await exists(dom, path.join(imageDir, volumeId), 'file'))) {
      await dom.unlink(path.join(imageDir, volumeId));
      removed = true;
    }
    if (removed) {
      await dom.fsyncDir(imageDir);
      this.opts.log?.info({ imageDir, volumeId }, 'removed leftovers of an interrupted create of the same volume');
    }
  }

  /** Removes a transaction directory this call made (its own files only, one by one). */
  private async removeOwnTxDir(dom: ConfinedRoot, txDir: string): Promise<void> {
    for (const name of await dom.listNames(txDir, ['file'])) {
      if (classifyVolumeEntry(name).kind !== 'foreign') await dom.unlink(path.join(txDir, name));
    }
    await dom.rmdir(txDir);
  }

  /**
   * Creates a volume's data file (new name, mode 0660) and lets qemu-img format it through the
   * opened fd: qemu-img is never given a path. A snapshot names its parent by relative name
   * in the header (-u: qemu-img does not open it); readers always state the backing themselves.
   */
  private async createData(dom: ConfinedRoot, file: string, r: VolumeRecord, signal?: AbortSignal, parentFormat?: VolumeFormatName): Promise<void> {
    const handle = await dom.createFile(file, 'volume');
    try {
      if (!r.parentId && r.format === 'RAW' && r.allocation === 'SPARSE') {
        await handle.truncate(r.capacityBytes);
      } else {
        // The new file is the child's fd 3: qemu-img formats what we created, wherever the name points now.
        const newFile = `/dev/fd/${FIRST_CHILD_FD}`;
        const qemu = { files: [handle], signal, command: this.opts.qemuImgBinary ? { file: this.opts.qemuImgBinary, args: [] } : undefined };
        if (r.parentId) {
          await runQemuImgWithFds(['create', '-q', '-u', '-f', 'qcow2', '-b', r.parentId, '-F', (parentFormat ?? 'RAW').toLowerCase(), newFile, String(r.capacityBytes)], qemu);
        } else {
          const options = r.allocation === 'PREALLOCATED' ? ['-o', 'preallocation=falloc'] : [];
          await runQemuImgWithFds(['create', '-q', '-f', r.format.toLowerCase(), ...options, newFile, String(r.capacityBytes)], qemu);
        }
        if (r.format === 'QCOW2') await checkQcow2Header(handle, `new volume ${r.volumeId}`);
      }
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  // -------------------------------------------------------------------------------------
  // Delete

  async deleteVolume(req: pb.DeleteVolumeRequest, signal?: AbortSignal): Promise<pb.DeleteVolumeResponse> {
    return this.measure('delete_volume', async () => {
      const root = validateDomainPath(req.domainPath);
      const imageId = validateId('image id', req.imageId);
      const volumeId = validateId('volume id', req.volumeId);
      const domain = await this.openDomain(root);
      await this.underDomainLease(domain, req.operationId, signal, async () => {
        const listing = await this.readImage(domain, imageId);
        const target = listing.records.find((r) => r.volumeId === volumeId);
        if (!target && !listing.unreadable.some((u) => u.volumeId === volumeId)) {
          throw notFound(`volume ${volumeId} is not in image ${imageId}`, 'VOLUME_NOT_FOUND');
        }
        this.refuseUnreadable({ ...listing, unreadable: listing.unreadable.filter((u) => u.volumeId !== volumeId) }, 'cannot prove the volume is a leaf');
        const child = listing.records.find((r) => r.parentId === volumeId);
        if (child) throw failedPrecondition(`volume ${volumeId} has a child (${child.volumeId}); only a leaf can be deleted`, 'VOLUME_HAS_CHILDREN');

        const volume = target ? await this.toVolume(domain, target, false) : undefined;
        // A volume a data job is writing (or reading) can't be deleted under it.
        const inUse = target ? (fn: () => Promise<void>) => this.underVolumeLease(domain, volumeId, target.leaseSlot, req.operationId, signal, fn) : (fn: () => Promise<void>) => fn();
        await inUse(async () => {
          if (listing.records.length + listing.unreadable.length === 1) {
            // The last volume: deleting it deletes the image, in one rename of the directory.
            await this.renameImageToGarbage(domain, imageId);
          } else {
            const imageDir = domain.layout.imageDir(imageId);
            const deletedMs = Date.now();
            this.fault('delete.before-rename');
            // Commit: the record leaves its committed name. The data file left behind has no
            // .meta and is garbage too; renaming it as well is tidiness, not correctness.
            await domain.dom.rename(path.join(imageDir, volumeMetaName(volumeId)), path.join(imageDir, deletedVolumeMetaName(volumeId, deletedMs)));
            await domain.dom.fsyncDir(imageDir);
            this.fault('delete.after-rename');
            await domain.dom.rename(path.join(imageDir, volumeId), path.join(imageDir, deletedVolumeDataName(volumeId, deletedMs))).catch((err: unknown) => {
              if (SdmeshError.from(err).code !== GrpcStatus.NOT_FOUND) throw err;
            });
            await domain.dom.fsyncDir(imageDir);
          }
        });
        this.opts.events?.publish({
          $case: 'volume',
          volume: { kind: pb.VolumeEvent_Kind.KIND_DELETED, volume, domainId: domain.md.domainId, imageId, operationId: req.operationId },
        });
        this.opts.log?.info({ domainId: domain.md.domainId, imageId, volumeId, operationId: req.operationId }, 'volume deleted');
      });
      return {};
    });
  }

  async deleteImage(req: pb.DeleteImageRequest, signal?: AbortSignal): Promise<pb.DeleteImageResponse> {
    return this.measure('delete_image', async () => {
      const root = validateDomainPath(req.domainPath);
      const imageId = validateId('image id', req.imageId);
      const domain = await this.openDomain(root);
      await this.underDomainLease(domain, req.operationId, signal, async () => {
        if (!(await exists(domain.dom, domain.layout.imageDir(imageId), 'directory'))) throw notFound(`image ${imageId} does not exist`, 'IMAGE_NOT_FOUND');
        // Every volume's lease, in id order (the global lock order), so no data job is using one.
        const { records } = await this.readImage(domain, imageId);
        const sorted = [...records].sort((a, b) => a.volumeId.localeCompare(b.volumeId));
        const renameUnderLeases = (i: number): Promise<void> =>
          i === sorted.length
            ? this.renameImageToGarbage(domain, imageId)
            : this.underVolumeLease(domain, sorted[i]!.volumeId, sorted[i]!.leaseSlot, req.operationId, signal, () => renameUnderLeases(i + 1));
        await renameUnderLeases(0);
        this.opts.events?.publish({
          $case: 'volume',
          volume: { kind: pb.VolumeEvent_Kind.KIND_IMAGE_DELETED, volume: undefined, domainId: domain.md.domainId, imageId, operationId: req.operationId },
        });
        this.opts.log?.info({ domainId: domain.md.domainId, imageId, operationId: req.operationId }, 'image deleted');
      });
      return {};
    });
  }

  private async renameImageToGarbage(domain: OpenDomain, imageId: string): Promise<void> {
    this.fault('delete.before-rename');
    await domain.dom.rename(domain.layout.imageDir(imageId), domain.layout.deletedImageDir(imageId, Date.now()));
    await domain.dom.fsyncDir(domain.layout.imagesDir);
    this.fault('delete.after-rename');
  }

  // -------------------------------------------------------------------------------------
  // Update

  async updateVolume(req: pb.UpdateVolumeRequest, signal?: AbortSignal): Promise<pb.Volume> {
    return this.measure('update', async () => {
      const root = validateDomainPath(req.domainPath);
      const imageId = validateId('image id', req.imageId);
      const volumeId = validateId('volume id', req.volumeId);
      if (!Number.isSafeInteger(req.generation) || req.generation < 0) {
        throw invalidArgument(`generation ${req.generation} must be a whole number ≥ 0`, 'INVALID_GENERATION');
      }
      let legality: VolumeRecord['legality'] | undefined;
      if (req.legality === pb.Legality.LEGALITY_LEGAL) legality = 'LEGAL';
      else if (req.legality === pb.Legality.LEGALITY_ILLEGAL) legality = 'ILLEGAL';
      else if (req.legality !== pb.Legality.LEGALITY_UNSPECIFIED) throw invalidArgument(`unknown legality ${req.legality}`, 'INVALID_LEGALITY');
      const description = req.description === undefined ? undefined : validateDescription(req.description);
      const domain = await this.openDomain(root);

      return this.underDomainLease(domain, req.operationId, signal, async () => {
        const metaPath = path.join(domain.layout.imageDir(imageId), volumeMetaName(volumeId));
        const readCurrent = () =>
          readVolumeRecord(metaPath, { volumeId, imageId, domainId: domain.md.domainId }).catch((err: unknown) => {
            const e = ioError(err, metaPath);
            throw e.code === GrpcStatus.NOT_FOUND ? notFound(`volume ${volumeId} is not in image ${imageId}`, 'VOLUME_NOT_FOUND') : e;
          });
        // Data jobs rewrite the record under the volume lease alone: read-modify-write under it too.
        const slot = (await readCurrent()).leaseSlot;
        return this.underVolumeLease(domain, volumeId, slot, req.operationId, signal, async () => {
          const current = await readCurrent();
          if (current.generation !== req.generation) {
            throw failedPrecondition(
              `volume ${volumeId} is at generation ${current.generation}, the request expected ${req.generation}`,
              'GENERATION_MISMATCH',
            );
          }
          const next: VolumeRecord = {
            ...current,
            legality: legality ?? current.legality,
            description: description ?? current.description,
            generation: current.generation + (req.bumpGeneration ? 1 : 0),
          };
          this.fault('update.before-write');
          await domain.dom.writeFileAtomic(metaPath, encodeVolumeRecord(next), {
            tempSuffix: TX_INFIX + newTxId(this.hostId),
            beforeCommit: () => this.fault('update.before-rename'),
          });
          this.fault('update.after-write');
          const volume = await this.toVolume(domain, next);
          this.opts.events?.publish({
            $case: 'volume',
            volume: { kind: pb.VolumeEvent_Kind.KIND_UPDATED, volume, domainId: domain.md.domainId, imageId, operationId: req.operationId },
          });
          return volume;
        });
      });
    });
  }

  // -------------------------------------------------------------------------------------
  // Reads (no lease: readers see committed names only, and every commit is one rename)

  async listImages(req: pb.ListImagesRequest): Promise<pb.ListImagesResponse> {
    return this.measure('list_images', async () => {
      const domain = await this.openDomain(validateDomainPath(req.domainPath));
      const images: pb.Image[] = [];
      for (const imageId of await listCommittedImageIds(domain.root)) {
        const listing = await this.readImage(domain, imageId).catch((err: unknown) => {
          // Deleted between listing and reading: skip it.
          if (SdmeshError.from(err).code === GrpcStatus.NOT_FOUND) return undefined;
          throw err;
        });
        if (!listing) continue;
        this.reportUnreadable(listing, 'list_images');
        const volumes = await Promise.all(orderChain(listing.records).map((r) => this.toVolume(domain, r)));
        images.push({ id: imageId, domainId: domain.md.domainId, volumes });
      }
      return { images };
    });
  }

  async listVolumes(req: pb.ListVolumesRequest): Promise<pb.ListVolumesResponse> {
    return this.measure('list_volumes', async () => {
      if (req.imageId) {
        const domain = await this.openDomain(validateDomainPath(req.domainPath));
        const listing = await this.readImage(domain, validateId('image id', req.imageId));
        this.reportUnreadable(listing, 'list_volumes');
        return { volumes: await Promise.all(orderChain(listing.records).map((r) => this.toVolume(domain, r))) };
      }
      const { images } = await this.listImages({ domainPath: req.domainPath });
      return { volumes: images.flatMap((i) => i.volumes) };
    });
  }

  async getVolume(req: pb.GetVolumeRequest, signal?: AbortSignal): Promise<pb.GetVolumeResponse> {
    return this.measure('get_volume', async () => {
      const domain = await this.openDomain(validateDomainPath(req.domainPath));
      const imageId = validateId('image id', req.imageId);
      const volumeId = validateId('volume id', req.volumeId);
      const imageDir = domain.layout.imageDir(imageId);
      const metaPath = path.join(imageDir, volumeMetaName(volumeId));
      const record = await readVolumeRecord(metaPath, { volumeId, imageId, domainId: domain.md.domainId }).catch((err: unknown) => {
        const e = ioError(err, metaPath);
        throw e.code === GrpcStatus.NOT_FOUND ? notFound(`volume ${volumeId} is not in image ${imageId}`, 'VOLUME_NOT_FOUND') : e;
      });
      const dataPath = path.join(imageDir, volumeId);
      if (!(await exists(domain.dom, dataPath, 'file'))) {
        throw new SdmeshError(GrpcStatus.DATA_LOSS, `volume ${volumeId} has a record but no data file ${dataPath}`, 'VOLUME_DATA_MISSING');
      }
      // The volume alone, opened confined, with the format its record states (no probing, no backing).
      const handle = await domain.dom.openFile(dataPath, { kind: 'volume' });
      let info;
      try {
        if (record.format === 'QCOW2') await checkQcow2Header(handle, `volume ${volumeId}`);
        info = await qemuImgInfo(handle, record.format, { signal, binary: this.opts.qemuImgBinary });
      } finally {
        await handle.close();
      }
      const volume = await this.toVolume(domain, record, false);
      volume.actualSizeBytes = info.actualSize;
      return { volume, qemuInfo: info };
    });
  }

  // -------------------------------------------------------------------------------------
  // Helpers

  private fault(point: FaultPoint): void {
    this.faults.hit(point);
  }

  private async openDomain(root: string): Promise<OpenDomain> {
    const md = await readDomainMetadata(root).catch((err: unknown) => {
      const e = ioError(err, `domain ${root}`);
      throw e.code === GrpcStatus.NOT_FOUND ? notFound(`${root} is not a storage domain (no dom_md/metadata)`, 'DOMAIN_NOT_FOUND') : e;
    });
    return { root, dom: new ConfinedRoot(root), layout: new DomainLayout(root), md, ref: { id: md.domainId, path: root } };
  }

  /** Committed records of an image; NOT_FOUND (IMAGE_NOT_FOUND) if the image is not committed. */
  private async readImage(domain: OpenDomain, imageId: string): Promise<VolumeListing> {
    const imageDir = domain.layout.imageDir(imageId);
    if (!(await exists(domain.dom, imageDir, 'directory'))) throw notFound(`image ${imageId} does not exist`, 'IMAGE_NOT_FOUND');
    return listVolumeRecords(imageDir, { imageId, domainId: domain.md.domainId });
  }

  private refuseUnreadable(listing: VolumeListing, why: string): void {
    const first = listing.unreadable[0];
    if (first) throw new SdmeshError(first.error.code, `${why}: ${first.error.message}`, first.error.reason);
  }

  private reportUnreadable(listing: VolumeListing, op: string): void {
    for (const u of listing.unreadable) {
      this.metrics.failures.inc({ op, reason: u.error.reason });
      this.opts.log?.error({ file: u.file, reason: u.error.reason, err: u.error.message }, 'unreadable volume record skipped in listing');
    }
  }

  /** A volume's lease without waiting (we hold the domain lease); held → ABORTED VOLUME_IN_USE. */
  private async underVolumeLease<T>(domain: OpenDomain, volumeId: string, slot: number, operationId: string, signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
    try {
      return await this.opts.leases.tryVolumeLease(domain.ref, volumeId, slot, operationId, fn, signal);
    } catch (err) {
      const e = SdmeshError.from(err);
      if (e.reason === 'LEASE_HELD' || e.reason === 'LEASE_HELD_ON_THIS_HOST') {
        throw aborted(`volume ${volumeId} is in use by a running data operation: ${e.message}`, 'VOLUME_IN_USE');
      }
      throw err;
    }
  }

  private async underDomainLease<T>(domain: OpenDomain, operationId: string, signal: AbortSignal | undefined, fn: () => Promise<T>): Promise<T> {
    const waitStarted = process.hrtime.bigint();
    return this.opts.leases.withDomainLease(
      domain.ref,
      operationId,
      async () => {
        this.metrics.leaseWait.observe(Number(process.hrtime.bigint() - waitStarted) / 1e9);
        throwIfAborted(signal);
        try {
          return await fn();
        } finally {
          await this.refreshSpace(domain.root, domain.md).catch(() => undefined);
        }
      },
      signal,
    );
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

  private async refreshSpace(root: string, md: DomainMetadata): Promise<{ capacity: number; free: number }> {
    const st = await fs.statfs(root);
    const capacity = st.blocks * st.bsize;
    const free = st.bavail * st.bsize;
    this.metrics.domainCapacity.set({ domain: md.domainId }, capacity);
    this.metrics.domainFree.set({ domain: md.domainId }, free);
    const critical = this.opts.lowSpaceCriticalBytes ?? 5 * 1024 ** 3;
    const state = free < critical ? 'critical' : free < capacity * (this.opts.lowSpaceWarningRatio ?? 0.1) ? 'warning' : 'ok';
    const previous = this.lowSpaceState.get(md.domainId) ?? 'ok';
    this.lowSpaceState.set(md.domainId, state);
    if (state !== 'ok' && state !== previous) {
      const kind = state === 'critical' ? pb.DomainEvent_Kind.KIND_LOW_SPACE_CRITICAL : pb.DomainEvent_Kind.KIND_LOW_SPACE_WARNING;
      this.opts.events?.publish({
        $case: 'domain',
        domain: { kind, domain: pb.StorageDomain.fromPartial({ id: md.domainId, name: md.name, path: root, capacityBytes: capacity, freeBytes: free }) },
      });
    }
    return { capacity, free };
  }

  private async checkSpaceFor(domain: OpenDomain, bytes: number): Promise<void> {
    const { free } = await this.refreshSpace(domain.root, domain.md);
    const critical = this.opts.lowSpaceCriticalBytes ?? 5 * 1024 ** 3;
    if (bytes > free - Math.min(critical, free)) {
      throw resourceExhausted(`preallocating ${bytes} bytes would leave less than the reserve on ${domain.root} (free ${free})`, 'INSUFFICIENT_SPACE');
    }
  }

  private async toVolume(domain: OpenDomain, r: VolumeRecord, withActualSize = true): Promise<pb.Volume> {
    const dataPath = path.join(domain.layout.imageDir(r.imageId), r.volumeId);
    let actualSizeBytes = 0;
    if (withActualSize) {
      const st = await domain.dom.lstat(dataPath).catch(() => undefined);
      actualSizeBytes = st?.isFile() ? st.blocks * 512 : 0;
    }
    return pb.Volume.fromPartial({
      id: r.volumeId,
      imageId: r.imageId,
      domainId: r.domainId,
      parentId: r.parentId,
      format: r.format === 'RAW' ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
      allocation: r.allocation === 'SPARSE' ? pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE : pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED,
      capacityBytes: r.capacityBytes,
      actualSizeBytes,
      legality: r.legality === 'LEGAL' ? pb.Legality.LEGALITY_LEGAL : pb.Legality.LEGALITY_ILLEGAL,
      generation: r.generation,
      createTime: new Date(r.ctimeMs),
      description: r.description,
      path: dataPath,
      lease: { lockspace: r.domainId, resource: r.volumeId, path: domain.layout.leasesPath, offset: leaseOffset(r.leaseSlot) },
    });
  }
}

/** Whether a committed volume is what a (retried) create request asked for. */
function sameShape(a: Omit<VolumeRecord, 'leaseSlot'>, b: Omit<VolumeRecord, 'leaseSlot'>): boolean {
  return a.imageId === b.imageId && a.parentId === b.parentId && a.format === b.format && a.allocation === b.allocation && a.capacityBytes === b.capacityBytes;
}
