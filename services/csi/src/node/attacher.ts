import fs from 'node:fs';
import path from 'node:path';
import {
  alreadyExists,
  csi,
  DomainLeases,
  fail,
  failedPrecondition,
  GrpcStatus,
  isLeaseHeldByAnother,
  isMountPoint,
  LeasedExport,
  MAX_CAPACITY_BYTES,
  notFound,
  openVolumeChain,
  QmpClient,
  Reason,
  resolveVolume,
  SdmeshError,
  type ExportLease,
  type LeaseHolder,
  type Logger,
  type ResolvedVolume,
} from '@sdmesh/common';
import {
  attachLoop,
  bindMount,
  blockDeviceSize,
  detachLoop,
  fileSystemType,
  growFileSystem,
  loopBackingFile,
  loopDevicesOn,
  makeFileSystem,
  mount,
  refreshLoopCapacity,
  unmountAll,
  type FsType,
} from './host-tools';
import { NodeState, type StagedVolume } from './state';
import { parseVolumeId, reachableDomains, resolveDiskLeaf } from './volumes';

const Mode = csi.VolumeCapability_AccessMode_Mode;

/** What a stage asks for, validated. */
export interface StageSpec {
  volumeId: string;
  stagingPath: string;
  access: 'block' | 'mount';
  fsType: FsType | '';
  mountFlags: string[];
  readOnly: boolean;
  sharedLease: boolean;
  /** The leaf generation the attachment was made at (publish_context), when the controller gave one. */
  expectedGeneration?: number;
}

/** How an access mode maps to the leaf's lease and the export. */
export function leaseModeOf(mode: csi.VolumeCapability_AccessMode_Mode, access: 'block' | 'mount'): { shared: boolean; readOnly: boolean } {
  switch (mode) {
    case Mode.SINGLE_NODE_READER_ONLY:
    case Mode.MULTI_NODE_READER_ONLY:
      return { shared: true, readOnly: true };
    case Mode.MULTI_NODE_MULTI_WRITER:
      // Several hosts writing one disk: only raw block (a cluster-aware guest, a VM live migration).
      if (access !== 'block')
        throw fail(Reason.INVALID_ARGUMENT, 'MULTI_NODE_MULTI_WRITER is supported for block access only (a file system must have one writer)');
      return { shared: true, readOnly: false };
    case Mode.SINGLE_NODE_WRITER:
    case Mode.SINGLE_NODE_SINGLE_WRITER:
    case Mode.SINGLE_NODE_MULTI_WRITER:
      return { shared: false, readOnly: false };
    default:
      throw fail(Reason.INVALID_ARGUMENT, `access mode ${csi.volumeCapability_AccessMode_ModeToJSON(mode)} is not supported by sdmesh`);
  }
}

/**
 * Attaches volumes on this host: a leased qemu-storage-daemon per staged volume (FUSE export of its
 * chain), a loop device on it, a file system for mount access, bind mounts for publishing. Every
 * step is recorded in the state dir first, so teardown (also after a plugin restart) undoes
 * exactly what was made.
 */
export class Attacher {
  private readonly exports = new Map<string, LeasedExport>();
  private readonly locks = new Map<string, Promise<void>>();

  constructor(
    readonly state: NodeState,
    private readonly holder: LeaseHolder,
    private readonly log: Logger,
  ) {}

  /**
   * Finds the storage daemons of volumes staged before a restart, and stops one a kill left
   * unrecorded (started, its record not yet written): it would hold its leases forever.
   */
  async adopt(): Promise<void> {
    const recorded = new Set(this.state.list().map((v) => NodeState.key(v.volumeId)));
    for (const name of fs.readdirSync(this.state.exportsDir).filter((n) => n.endsWith('.qmp'))) {
      const key = name.slice(0, -'.qmp'.length);
      if (recorded.has(key)) continue;
      const qmp = await QmpClient.connect(path.join(this.state.exportsDir, name), 5000).catch(() => undefined);
      if (qmp) {
        this.log.warn({ qmpSocket: name }, 'stopping a storage daemon no staged volume records (its stage was interrupted)');
        await qmp.execute('quit').catch(() => undefined); // the connection closes as it exits
        qmp.close();
      }
      const exportFile = path.join(this.state.exportsDir, `${key}.img`);
      for (const dev of loopDevicesOn(exportFile)) await detachLoop(dev, exportFile);
      for (let i = 0; i < 100 && isMountPoint(exportFile); i++) {
        await unmountAll(exportFile).catch(() => new Promise((r) => setTimeout(r, 100))); // busy until the daemon is gone
      }
      fs.rmSync(path.join(this.state.exportsDir, name), { force: true });
      fs.rmSync(exportFile, { force: true });
    }
    for (const v of this.state.list()) {
      const exp = await LeasedExport.adopt(v.export, this.log);
      if (exp) this.exports.set(v.volumeId, exp);
      else
        this.log.warn(
          { volumeId: v.volumeId, pid: v.export.pid },
          'the storage daemon of a staged volume is gone: its condition is abnormal until it is unstaged',
        );
    }
  }

  /** One operation per volume at a time (the CO may retry while a call runs). */
  async serialized<T>(volumeId: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.locks.get(volumeId) ?? Promise.resolve();
    let done!: () => void;
    const mine = new Promise<void>((r) => (done = r));
    const tail = previous.then(() => mine);
    this.locks.set(volumeId, tail);
    await previous;
    try {
      return await fn();
    } finally {
      done();
      if (this.locks.get(volumeId) === tail) this.locks.delete(volumeId);
    }
  }

  staged(volumeId: string): StagedVolume | undefined {
    return this.state.get(volumeId);
  }

  exportOf(volumeId: string): LeasedExport | undefined {
    return this.exports.get(volumeId);
  }

  /** SIGKILLs every storage daemon (the host lost sanlock: nothing may write any more). */
  fenceAll(): void {
    for (const exp of this.exports.values()) exp.kill();
  }

  private async domainOf(domainId: string): Promise<{ id: string; path: string }> {
    const domain = (await reachableDomains()).find((d) => d.id === domainId);
    if (!domain) throw notFound(`storage domain ${domainId} is not reachable from this host`, Reason.DOMAIN_NOT_FOUND);
    return domain;
  }

  async stage(spec: StageSpec): Promise<void> {
    const existing = this.state.get(spec.volumeId);
    if (existing) {
      const same =
        existing.stagingPath === spec.stagingPath &&
        existing.access === spec.access &&
        existing.readOnly === spec.readOnly &&
        existing.sharedLease === spec.sharedLease &&
        (spec.access === 'block' || !spec.fsType || existing.fsType === spec.fsType);
      if (!same) {
        throw alreadyExists(
          `volume ${spec.volumeId} is staged at ${existing.stagingPath} (${existing.access}${existing.readOnly ? ', read-only' : ''}) already, incompatibly with this request`,
          Reason.STAGED_INCOMPATIBLY,
        );
      }
      // A stage whose storage daemon died (lease lost, fenced) is not done: the device would fail every I/O.
      if (!this.exports.get(spec.volumeId)?.running()) {
        throw failedPrecondition(`the storage daemon of volume ${spec.volumeId} is gone (lease lost?): unstage it, then stage it again`, Reason.EXPORT_DOWN);
      }
      if (existing.loopDevice && (existing.access === 'block' || existing.mounted)) return; // done before: idempotent
      await this.finishStage(existing, spec);
      return;
    }
    const { domainId, imageId } = parseVolumeId(spec.volumeId);
    const domain = await this.domainOf(domainId);
    const leaf = await resolveDiskLeaf(domain, imageId);
    // Writers on several hosts at once are safe only on raw: two qemu processes allocating qcow2
    // clusters in one image each keep their own metadata and corrupt it.
    if (spec.sharedLease && !spec.readOnly && (leaf.record.format !== 'RAW' || leaf.ancestors.length)) {
      throw failedPrecondition(
        `volume ${spec.volumeId} is ${leaf.record.format.toLowerCase()}${leaf.ancestors.length ? ' with a backing chain' : ''}: MULTI_NODE_MULTI_WRITER needs a raw disk without snapshots`,
        Reason.UNSUPPORTED_IMAGE,
      );
    }
    refuseLinkedPath(spec.stagingPath, 'staging_target_path');
    if (!fs.statSync(spec.stagingPath, { throwIfNoEntry: false })?.isDirectory()) {
      throw fail(Reason.INVALID_ARGUMENT, `staging_target_path ${spec.stagingPath} is not a directory`);
    }
    const exp = await this.startExport(spec, leaf);
    const record: StagedVolume = {
      volumeId: spec.volumeId,
      stagingPath: spec.stagingPath,
      access: spec.access,
      fsType: spec.access === 'mount' ? spec.fsType || 'ext4' : '',
      mountFlags: spec.mountFlags,
      readOnly: spec.readOnly,
      sharedLease: spec.sharedLease,
      domain,
      imageId,
      leafVolumeId: leaf.volumeId,
      export: exp.handle,
      exportFile: (exp.handle.target as { mountpoint: string }).mountpoint,
      loopDevice: '',
      mounted: false,
      published: {},
    };
    try {
      this.state.put(record);
    } catch (err) {
      await exp.stop();
      throw err;
    }
    this.exports.set(spec.volumeId, exp);
    await this.finishStage(record, spec);
  }

  /** Starts the volume's storage daemon: it takes the chain's leases, then exports the chain on a FUSE file. */
  private async startExport(spec: StageSpec, leaf: ResolvedVolume): Promise<LeasedExport> {
    const key = NodeState.key(spec.volumeId);
    const chain = await openVolumeChain(leaf, { write: !spec.readOnly, readDirect: true });
    // The leaf as the access mode says; its ancestors are only read. One global order (volume id)
    // as every sdmesh lease taker keeps, so two hosts never wait on each other crosswise.
    const leases: ExportLease[] = [
      {
        location: DomainLeases.location(leaf.domain, leaf.volumeId, leaf.record.leaseSlot),
        mode: spec.sharedLease ? ('shared' as const) : ('exclusive' as const),
      },
      ...leaf.ancestors.map((a) => ({ location: DomainLeases.location(leaf.domain, a.volumeId, a.leaseSlot), mode: 'shared' as const })),
    ].sort((a, b) => a.location.resource.localeCompare(b.location.resource));
    try {
      await this.holder.ensureLockspace(leaf.domain.id, path.join(leaf.domain.path, 'dom_md', 'ids'), { timeoutMs: 120_000 });
      return await LeasedExport.start({
        id: key,
        runDir: this.state.exportsDir,
        layers: chain.handles.map((h, i) => ({ file: h, format: chain.formats[i]! })),
        writable: !spec.readOnly,
        target: { type: 'fuse', mountpoint: path.join(this.state.exportsDir, `${key}.img`) },
        leases,
        leaseManager: this.holder.leaseManager,
        operationId: `csi-stage:${spec.volumeId}`.slice(0, 128),
        underLeases: () => checkUnderLeases(leaf, spec.expectedGeneration),
        log: this.log,
      });
    } catch (err) {
      if (isLeaseHeldByAnother(err)) {
        throw failedPrecondition(
          `volume ${spec.volumeId} is staged on another host (or by another process of this one) in a mode that excludes this stage: ${SdmeshError.from(err).message}`,
          Reason.STAGED_ELSEWHERE,
        );
      }
      throw err;
    } finally {
      await chain.close();
    }
  }

  private async finishStage(record: StagedVolume, spec: StageSpec): Promise<void> {
    if (!record.loopDevice) {
      // A loop device attached before a kill left it unrecorded is taken over, not doubled.
      record.loopDevice = loopDevicesOn(record.exportFile)[0] ?? (await attachLoop(record.exportFile, record.readOnly));
      this.state.put(record);
    }
    if (record.access === 'block' || record.mounted) return;
    const found = await fileSystemType(record.loopDevice);
    if (!found) {
      if (record.readOnly)
        throw failedPrecondition(`volume ${record.volumeId} has no file system and is staged read-only: nothing to mount`, Reason.NO_FILE_SYSTEM);
      // Only a disk without any file system (blkid finds nothing) is formatted: never a second time.
      await makeFileSystem(record.loopDevice, (record.fsType || 'ext4') as FsType);
    } else if (found !== record.fsType) {
      if (spec.fsType) {
        throw failedPrecondition(`volume ${record.volumeId} holds a ${found} file system, not ${spec.fsType}: it is not re-formatted`, Reason.FS_TYPE_MISMATCH);
      }
      record.fsType = found;
    }
    await mount(record.loopDevice, record.stagingPath, { fsType: record.fsType, options: [...record.mountFlags, ...(record.readOnly ? ['ro'] : [])] });
    record.mounted = true;
    this.state.put(record);
  }

  /** Undoes a stage: unmount, loop device, storage daemon (its leases go with it). Unknown → done. */
  async unstage(volumeId: string, stagingPath: string): Promise<void> {
    const record = this.state.get(volumeId);
    if (!record) return;
    if (record.stagingPath !== stagingPath) {
      throw notFound(`volume ${volumeId} is staged at ${record.stagingPath}, not at ${stagingPath}`);
    }
    const still = Object.keys(record.published).filter((t) => isMountPoint(t));
    if (still.length) throw failedPrecondition(`volume ${volumeId} is still published at ${still.join(', ')}: unpublish it first`, Reason.STILL_PUBLISHED);
    if (record.access === 'mount') {
      await unmountAll(record.stagingPath);
      record.mounted = false;
      this.state.put(record);
    }
    // The recorded loop device, and one attached before a kill left it unrecorded.
    for (const dev of new Set([record.loopDevice, ...loopDevicesOn(record.exportFile)].filter(Boolean))) {
      await detachLoop(dev, record.exportFile);
    }
    if (record.loopDevice) {
      record.loopDevice = '';
      this.state.put(record);
    }
    const exp = this.exports.get(volumeId) ?? (await LeasedExport.adopt(record.export, this.log));
    if (exp) await exp.stop();
    else await unmountAll(record.exportFile); // the daemon died: its FUSE mount may be left
    fs.rmSync(record.exportFile, { force: true });
    this.exports.delete(volumeId);
    this.state.remove(volumeId);
  }

  async publish(volumeId: string, stagingPath: string, targetPath: string, readOnly: boolean, access: 'block' | 'mount'): Promise<void> {
    const record = this.state.get(volumeId);
    if (!record || record.stagingPath !== stagingPath) {
      throw failedPrecondition(`volume ${volumeId} is not staged at ${stagingPath} on this node: stage it first`, Reason.NOT_STAGED);
    }
    if (record.access !== access) {
      throw alreadyExists(`volume ${volumeId} is staged for ${record.access} access, the publish asks for ${access}`, Reason.STAGED_INCOMPATIBLY);
    }
    const prior = record.published[targetPath];
    if (prior && isMountPoint(targetPath)) {
      if (prior.readOnly !== readOnly) {
        throw alreadyExists(`volume ${volumeId} is published at ${targetPath} already with readonly=${prior.readOnly}`, Reason.STAGED_INCOMPATIBLY);
      }
      return;
    }
    refuseLinkedPath(targetPath, 'target_path');
    const ro = readOnly || record.readOnly;
    record.published[targetPath] = { readOnly };
    this.state.put(record);
    if (access === 'block') {
      // The target is a file the device is bound onto.
      fs.mkdirSync(path.dirname(targetPath), { recursive: true });
      fs.closeSync(fs.openSync(targetPath, 'a', 0o600));
      await bindMount(record.loopDevice, targetPath, ro);
    } else {
      fs.mkdirSync(targetPath, { recursive: true });
      await bindMount(record.stagingPath, targetPath, ro);
    }
  }

  /** Undoes a publish; a target that is not mounted is done already. */
  async unpublish(volumeId: string, targetPath: string): Promise<void> {
    const record = this.state.get(volumeId);
    if (!record || !(targetPath in record.published)) {
      // Not ours: never unmount or delete what another volume (or someone else) put there.
      if (isMountPoint(targetPath)) throw notFound(`volume ${volumeId} is not published at ${targetPath}`);
      return;
    }
    await unmountAll(targetPath);
    // Only the empty mount point (directory) or bind target (file) this publish made: never anything in it.
    const st = fs.lstatSync(targetPath, { throwIfNoEntry: false });
    if (st?.isDirectory()) fs.rmdirSync(targetPath);
    else if (st) fs.rmSync(targetPath);
    delete record.published[targetPath];
    this.state.put(record);
  }

  /** Grows the export (QMP block_resize), the loop device, then the file system. Returns the new size. */
  async expand(volumeId: string, requiredBytes: number): Promise<number> {
    const record = this.state.get(volumeId);
    if (!record) throw notFound(`volume ${volumeId} is not staged on this node`);
    const exp = this.exports.get(volumeId);
    if (!exp?.running())
      throw failedPrecondition(`the storage daemon of volume ${volumeId} is not running (lease lost?): unstage and stage it again`, Reason.EXPORT_DOWN);
    const current = await exp.size();
    if (requiredBytes > current) {
      // Online: the storage daemon holds the leaf's lease, so it grows the image (the data-mover's
      // ExtendDisk would need that lease). The controller keeps the disk's record (docs/csi.md, "Node").
      if (requiredBytes > MAX_CAPACITY_BYTES)
        throw new SdmeshError(
          GrpcStatus.OUT_OF_RANGE,
          `required_bytes ${requiredBytes} exceeds the largest volume (${MAX_CAPACITY_BYTES} bytes)`,
          'OUT_OF_RANGE',
        );
      await exp.resize(requiredBytes);
    }
    // The kernel caches the FUSE file's size for the export's attribute timeout: a stat after it
    // expires reads the new size, which the loop device then takes.
    const size = await exp.size();
    for (let i = 0; i < 100 && fs.statSync(record.exportFile).size !== size; i++) await new Promise((r) => setTimeout(r, 100));
    await refreshLoopCapacity(record.loopDevice);
    if (record.access === 'mount' && record.mounted) await growFileSystem(record.fsType, record.loopDevice, record.stagingPath);
    return blockDeviceSize(record.loopDevice);
  }

  /** Why a staged volume can't be trusted now ('' when healthy). */
  condition(record: StagedVolume): string {
    const exp = this.exports.get(record.volumeId);
    if (!exp?.running()) {
      return `the storage daemon of this volume (pid ${record.export.pid}) is gone: its sanlock lease was lost (lockspace lost or sanlock died) or it was killed; I/O fails until the volume is staged again`;
    }
    if (record.loopDevice && loopBackingFile(record.loopDevice) !== record.exportFile)
      return `loop device ${record.loopDevice} is no longer attached to the export`;
    return '';
  }
}

/**
 * Refuses a target that is a symbolic link: the bind mount (and the file a block publish creates)
 * would land wherever the link points. Its directories are the orchestrator's (kubelet's root dir
 * may be a link) and are taken as given.
 */
function refuseLinkedPath(p: string, field: string): void {
  if (fs.lstatSync(p, { throwIfNoEntry: false })?.isSymbolicLink()) {
    throw fail(Reason.INVALID_ARGUMENT, `${field} ${p} is a symbolic link: give the real path`);
  }
}

/**
 * Under the daemon's leases, before any image is opened: the leaf is still the disk's leaf,
 * LEGAL, and at the generation the attachment was made at (a controller that fenced this
 * attachment bumped it).
 */
async function checkUnderLeases(leaf: ResolvedVolume, expectedGeneration: number | undefined): Promise<void> {
  const now = await resolveVolume('volume', { domainPath: leaf.domain.path, imageId: leaf.imageId, volumeId: leaf.volumeId });
  if (now.children.length) throw failedPrecondition(`volume ${leaf.volumeId} got a snapshot while it was being staged: stage again`, Reason.VOLUME_NOT_LEAF);
  if (now.record.legality !== 'LEGAL') {
    throw failedPrecondition(`volume ${leaf.volumeId} is ILLEGAL (a data operation on it is unfinished): refusing to attach it`, Reason.VOLUME_ILLEGAL);
  }
  if (expectedGeneration !== undefined && now.record.generation !== expectedGeneration) {
    throw failedPrecondition(
      `volume ${leaf.volumeId} is at generation ${now.record.generation}, the attachment was made at ${expectedGeneration}: it was fenced`,
      Reason.GENERATION_MISMATCH,
    );
  }
}
