import {
  aborted,
  alreadyExists,
  callOptions,
  csi,
  failedPrecondition,
  GrpcStatus,
  hasReason,
  invalidArgument,
  notFound,
  pb,
  Reason,
  resourceExhausted,
  SdmeshError,
  service,
  type CallContext,
  type CallOptions,
  type RegisteredService,
} from '@sdmesh/common';
import { MAX_VOLUMES_PER_NODE } from '../node';
import { domainTopologyKey, DRIVER_NAME, topologyDomains, type PluginContext } from '../plugin';
import { accessPolicy, checkCapabilities, unsupported } from './capabilities';
import {
  checkCsiName,
  decodeToken,
  encodeToken,
  formatId,
  nameHash,
  parseId,
  parseLabel,
  requestHash,
  requestIdFor,
  snapshotLabel,
  volumeLabel,
  type DiskRef,
  type RequestKind,
} from './names';
import { connectScheduler, findDisk, findOperation, hasEnded, isNotFound, isRequestIdExpired, waitDone, type SchedulerApi } from './scheduler-api';

/** Size of a volume whose request names none. */
export const DEFAULT_VOLUME_BYTES = 1024 ** 3;
const MAX_VOLUME_BYTES = 64 * 1024 ** 4;
/** Incarnations of one name walked before giving up (each is one ListOperations on the scheduler). */
const MAX_INCARNATIONS = 1000;
/** StorageClass keys the external-provisioner adds (--extra-create-metadata): accepted, unused. */
const PROVISIONER_KEY = /^csi\.storage\.k8s\.io\//;

const RPC = csi.ControllerServiceCapability_RPC_Type;
/** What the controller advertises (ControllerGetCapabilities). */
export const CONTROLLER_CAPABILITIES = [
  RPC.CREATE_DELETE_VOLUME,
  RPC.PUBLISH_UNPUBLISH_VOLUME,
  RPC.LIST_VOLUMES,
  RPC.GET_CAPACITY,
  RPC.CREATE_DELETE_SNAPSHOT,
  RPC.LIST_SNAPSHOTS,
  RPC.CLONE_VOLUME,
  RPC.PUBLISH_READONLY,
  RPC.EXPAND_VOLUME,
  RPC.LIST_VOLUMES_PUBLISHED_NODES,
  RPC.VOLUME_CONDITION,
  RPC.GET_VOLUME,
];

export interface StorageClassParams {
  domain: string;
  format: pb.VolumeFormat;
  allocation: pb.VolumeAllocation;
}

/** StorageClass parameters: domain (id), format raw|qcow2, allocation sparse|preallocated. */
export function parseParameters(params: Record<string, string>): StorageClassParams {
  const out: StorageClassParams = { domain: '', format: pb.VolumeFormat.VOLUME_FORMAT_RAW, allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE };
  for (const [k, v] of Object.entries(params)) {
    if (k === 'domain') out.domain = v;
    else if (k === 'format') {
      if (v !== 'raw' && v !== 'qcow2') throw invalidArgument(`parameters.format "${v}" is not raw or qcow2`);
      out.format = v === 'raw' ? pb.VolumeFormat.VOLUME_FORMAT_RAW : pb.VolumeFormat.VOLUME_FORMAT_QCOW2;
    } else if (k === 'allocation') {
      if (v !== 'sparse' && v !== 'preallocated') throw invalidArgument(`parameters.allocation "${v}" is not sparse or preallocated`);
      out.allocation = v === 'sparse' ? pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE : pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED;
    } else if (!PROVISIONER_KEY.test(k)) throw invalidArgument(`unknown parameter "${k.slice(0, 64)}" (known: domain, format, allocation)`);
  }
  return out;
}

/**
 * The size a capacity range asks for: required rounded up to 512 bytes, or (none) the default
 * within the limit, or at least `floor` (a source's size). OUT_OF_RANGE when it can't fit.
 */
export function sizeFor(range: csi.CapacityRange | undefined, floor = 0): number {
  const required = range?.requiredBytes ?? 0;
  const limit = range?.limitBytes ?? 0;
  if (required < 0 || limit < 0) throw invalidArgument('capacity_range: bytes must not be negative');
  if (limit > 0 && required > limit) throw outOfRange(`capacity_range: required_bytes ${required} exceeds limit_bytes ${limit}`);
  let size =
    required > 0
      ? Math.ceil(required / 512) * 512
      : floor > 0
        ? floor
        : limit > 0
          ? Math.min(DEFAULT_VOLUME_BYTES, Math.floor(limit / 512) * 512)
          : DEFAULT_VOLUME_BYTES;
  size = Math.max(size, floor);
  if (size <= 0 || (limit > 0 && size > limit))
    throw outOfRange(`capacity_range [${required}, ${limit || 'no limit'}] allows no size of 512-byte sectors of at least ${floor} bytes`);
  if (size > MAX_VOLUME_BYTES) throw outOfRange(`capacity ${size} exceeds the maximum of 64 TiB`);
  return size;
}

const outOfRange = (message: string) => new SdmeshError(GrpcStatus.OUT_OF_RANGE, message, 'OUT_OF_RANGE');

const isLegal = (d: pb.Disk) => d.legality === pb.Legality.LEGALITY_LEGAL;
const ref = (d: pb.Disk): DiskRef => ({ domainId: d.storageDomainId, diskId: d.id });

function condition(d: pb.Disk): csi.VolumeCondition {
  return isLegal(d)
    ? { abnormal: false, message: 'volume is LEGAL' }
    : { abnormal: true, message: 'a volume of the disk is ILLEGAL: a data operation on it is running or failed (see sdmctl disks get)' };
}

/**
 * The CSI Controller: volumes are sdmesh disks, snapshots are template disks (full, collapsed
 * copies of the volume, so they outlive it), publish/unpublish are the scheduler's disk
 * attachments. Every call is idempotent: names map to request ids (names.ts).
 */
export class CsiController {
  constructor(private readonly api: SchedulerApi) {}

  // ------------------------------------------------------------------ listing helpers

  private async allDomains(call: CallOptions): Promise<pb.StorageDomain[]> {
    const out: pb.StorageDomain[] = [];
    let pageToken = '';
    do {
      const r = await this.api.domains.listStorageDomains({ pageSize: 1000, pageToken }, call);
      out.push(...r.storageDomains);
      pageToken = r.nextPageToken;
    } while (pageToken);
    return out.sort((a, b) => a.id.localeCompare(b.id));
  }

  /** Every disk carrying a label `accept` takes, in every domain. */
  private async findLabelled(accept: (description: string) => boolean, call: CallOptions): Promise<pb.Disk[]> {
    const found: pb.Disk[] = [];
    for (const d of await this.allDomains(call)) {
      let pageToken = '';
      do {
        const r = await this.api.disks.listDisks({ storageDomainId: d.id, pageSize: 1000, pageToken }, call);
        found.push(...r.disks.filter((disk) => accept(disk.description)));
        pageToken = r.nextPageToken;
      } while (pageToken);
    }
    return found;
  }

  /** One page of disks `accept` takes, across domains in id order (see names.ts for the token). */
  private async page(
    startingToken: string,
    maxEntries: number,
    accept: (d: pb.Disk) => boolean,
    call: CallOptions,
  ): Promise<{ disks: pb.Disk[]; next: string }> {
    if (maxEntries < 0) throw invalidArgument('max_entries must not be negative');
    const domains = await this.allDomains(call);
    const start = startingToken ? decodeToken(startingToken) : { domainId: '', pageToken: '' };
    if (!start) throw aborted('starting_token is not one this plugin gave out: list again from the start');
    let idx = domains.findIndex((d) => d.id >= start.domainId);
    let pageToken = idx >= 0 && domains[idx]!.id === start.domainId ? start.pageToken : '';
    const disks: pb.Disk[] = [];
    while (idx >= 0 && idx < domains.length) {
      const want = maxEntries > 0 ? maxEntries - disks.length : 1000;
      let r: pb.ListDisksResponse;
      try {
        r = await this.api.disks.listDisks({ storageDomainId: domains[idx]!.id, pageSize: want, pageToken }, call);
      } catch (err) {
        if (hasReason(err, Reason.INVALID_PAGE_TOKEN)) throw aborted('starting_token is no longer valid: list again from the start');
        throw err;
      }
      disks.push(...r.disks.filter(accept));
      if (r.nextPageToken) pageToken = r.nextPageToken;
      else {
        idx++;
        pageToken = '';
      }
      if (maxEntries > 0 && disks.length >= maxEntries) {
        const more = idx < domains.length;
        return { disks, next: more ? encodeToken({ domainId: domains[idx]!.id, pageToken }) : '' };
      }
    }
    return { disks, next: '' };
  }

  private async publishedNodes(call: CallOptions, disk?: DiskRef): Promise<Map<string, string[]>> {
    const { attachments } = await this.api.attachments.listDiskAttachments({ storageDomainId: disk?.domainId ?? '', diskId: disk?.diskId ?? '' }, call);
    const out = new Map<string, string[]>();
    for (const a of attachments) out.set(a.diskId, [...(out.get(a.diskId) ?? []), a.host]);
    return out;
  }

  /** A volume (a disk that is not a template) by id, or NOT_FOUND. */
  private async volume(volumeId: string, call: CallOptions): Promise<pb.Disk> {
    const r = parseId(volumeId);
    const d = r && (await findDisk(this.api, r.domainId, r.diskId, call));
    if (!d || d.template) throw notFound(`volume ${volumeId.slice(0, 128)} does not exist`);
    return d;
  }

  private volumeMessage(d: pb.Disk, source?: csi.VolumeContentSource): csi.Volume {
    return {
      capacityBytes: d.capacityBytes,
      volumeId: formatId(ref(d)),
      volumeContext: { domainId: d.storageDomainId, format: d.format === pb.VolumeFormat.VOLUME_FORMAT_QCOW2 ? 'qcow2' : 'raw' },
      contentSource: source,
      accessibleTopology: [{ segments: { [domainTopologyKey(d.storageDomainId)]: 'true' } }],
    };
  }

  private snapshotMessage(d: pb.Disk): csi.Snapshot {
    const label = parseLabel(d.description);
    const source = label?.kind === 'csi-snapshot' ? formatId({ domainId: d.storageDomainId, diskId: label.sourceDiskId }) : '';
    return {
      sizeBytes: d.capacityBytes,
      snapshotId: formatId(ref(d)),
      sourceVolumeId: source,
      creationTime: d.volumes[0]?.createTime,
      readyToUse: d.template && isLegal(d),
      groupSnapshotId: '',
    };
  }

  /**
   * The disk a named request made, running `submit` for it if none did: walks the name's
   * incarnations (names.ts). `existing` is the disk found by its label, if any.
   */
  private async createNamed(
    kind: RequestKind,
    name: string,
    existing: pb.Disk | undefined,
    submit: (requestId: string) => Promise<pb.Operation>,
    call: CallOptions,
  ): Promise<pb.Disk> {
    for (let n = 1; n <= MAX_INCARNATIONS; n++) {
      const requestId = requestIdFor(kind, name, n);
      let op = await findOperation(this.api, requestId, call);
      const ended = op && hasEnded(op);
      if (ended && op!.status !== pb.OperationStatus.OPERATION_STATUS_DONE) continue; // a failed earlier try
      if (ended) {
        const made = op!.result?.$case === 'disk' ? op!.result.disk : undefined;
        const d = made && (await findDisk(this.api, made.storageDomainId, made.id, call));
        if (d) return d;
        continue; // an earlier incarnation, deleted
      }
      if (!op) {
        if (existing) throw aborted(`${kind} "${name.slice(0, 64)}" exists as disk ${existing.id} but is not usable (ILLEGAL) and nothing is working on it`);
        try {
          op = await submit(requestId);
        } catch (err) {
          if (isRequestIdExpired(err)) continue;
          throw err;
        }
      }
      const done = await waitDone(this.api, op, call);
      const made = done.result?.$case === 'disk' ? done.result.disk : undefined;
      if (!made) throw new SdmeshError(GrpcStatus.INTERNAL, `operation ${done.name} ended without a disk`);
      const d = await findDisk(this.api, made.storageDomainId, made.id, call);
      if (!d) throw aborted(`disk ${made.id} made by ${done.name} is gone again`);
      return d;
    }
    throw new SdmeshError(GrpcStatus.RESOURCE_EXHAUSTED, `name "${name.slice(0, 64)}" was created ${MAX_INCARNATIONS} times: use another name`);
  }

  /** Grows a disk to `size` (no-op when it is that big already); one request id per (disk, size). */
  private async grow(d: pb.Disk, size: number, call: CallOptions): Promise<pb.Disk> {
    if (d.capacityBytes >= size) return d;
    const op = await this.api.disks.extendDisk(
      { requestId: `csi-expand-${d.id}-${size}`, storageDomainId: d.storageDomainId, diskId: d.id, capacityBytes: size },
      call,
    );
    await waitDone(this.api, op, call);
    return (await findDisk(this.api, d.storageDomainId, d.id, call)) ?? d;
  }

  /** The domain a new volume goes to: the StorageClass's, else the topology's first active one, else the only one. */
  private async chooseDomain(params: StorageClassParams, topo: csi.TopologyRequirement | undefined, preferred: string, call: CallOptions): Promise<string> {
    const active = (await this.allDomains(call)).filter((d) => d.status === pb.DomainStatus.DOMAIN_STATUS_ACTIVE).map((d) => d.id);
    const requisite = (topo?.requisite ?? []).map((t) => topologyDomains(t.segments));
    const allowed = (id: string) => requisite.length === 0 || requisite.some((ids) => ids.includes(id));
    if (params.domain) {
      if (!active.includes(params.domain)) throw invalidArgument(`parameters.domain ${params.domain.slice(0, 64)} is not an active storage domain`);
      if (!allowed(params.domain)) throw resourceExhausted(`storage domain ${params.domain} is outside the requisite topology`);
      return params.domain;
    }
    const ordered = [preferred, ...(topo?.preferred ?? []).flatMap((t) => topologyDomains(t.segments)), ...requisite.flat()].filter(Boolean);
    const pick = ordered.find((id) => active.includes(id) && allowed(id));
    if (pick) return pick;
    if (requisite.length > 0) throw resourceExhausted('no active storage domain in the requisite topology');
    if (active.length === 1) return active[0]!;
    throw invalidArgument(`parameters.domain is required: the mesh has ${active.length} active storage domains and no topology names one`);
  }

  // ------------------------------------------------------------------ volumes

  async createVolume(req: csi.CreateVolumeRequest, call: CallOptions): Promise<csi.CreateVolumeResponse> {
    const name = checkCsiName(req.name);
    checkCapabilities(req.volumeCapabilities);
    const params = parseParameters(req.parameters);
    const src = req.volumeContentSource?.type;
    let source: pb.Disk | undefined;
    if (src) {
      const id = src.$case === 'snapshot' ? src.snapshot.snapshotId : src.volume.volumeId;
      const r = parseId(id);
      source = r && (await findDisk(this.api, r.domainId, r.diskId, call));
      const isSnapshot = src.$case === 'snapshot';
      if (!source || source.template !== isSnapshot) throw notFound(`source ${src.$case} ${id.slice(0, 128)} does not exist`);
      if (!isLegal(source)) throw failedPrecondition(`source ${src.$case} ${id} is ILLEGAL (an unfinished data operation)`, Reason.DISK_ILLEGAL);
    }
    const size = sizeFor(req.capacityRange, source?.capacityBytes ?? 0);
    // Several writers share one raw image (the nodes refuse qcow2 and chains for that mode).
    const rwx = req.volumeCapabilities.some((c) => c.accessMode?.mode === csi.VolumeCapability_AccessMode_Mode.MULTI_NODE_MULTI_WRITER);
    if (rwx && params.format !== pb.VolumeFormat.VOLUME_FORMAT_RAW)
      throw invalidArgument('MULTI_NODE_MULTI_WRITER volumes are raw: parameters.format must be raw');
    const hash = requestHash({
      domain: params.domain,
      format: params.format,
      allocation: params.allocation,
      source: src ? `${src.$case}:${formatId(ref(source!))}` : '',
      required: req.capacityRange?.requiredBytes ?? 0,
      limit: req.capacityRange?.limitBytes ?? 0,
      rwx: rwx ? 1 : 0,
    });
    const nh = nameHash(name);
    const existing = (
      await this.findLabelled((desc) => {
        const l = parseLabel(desc);
        return l?.kind === 'csi-volume' && l.nameHash === nh;
      }, call)
    ).find((d) => !d.template);
    if (existing) {
      const l = parseLabel(existing.description);
      if (l?.kind === 'csi-volume' && l.requestHash !== hash) {
        throw alreadyExists(`volume "${name.slice(0, 64)}" exists (${formatId(ref(existing))}) with another capacity, parameters or source`);
      }
    }
    let disk = existing && isLegal(existing) ? existing : undefined;
    if (!disk) {
      const domainId = await this.chooseDomain(params, req.accessibilityRequirements, source?.storageDomainId ?? '', call);
      const description = volumeLabel(name, hash);
      disk = await this.createNamed(
        'volume',
        name,
        existing,
        (requestId) => {
          if (!source)
            return this.api.disks.createDisk(
              { requestId, storageDomainId: domainId, capacityBytes: size, format: params.format, allocation: params.allocation, description },
              call,
            );
          if (source.template) {
            // A restore: a thin qcow2 overlay on the snapshot in its domain; a full copy elsewhere, or
            // for several writers (one raw image, no chain).
            const thin = source.storageDomainId === domainId && !rwx;
            return this.api.disks.cloneDisk(
              {
                requestId,
                storageDomainId: source.storageDomainId,
                templateDiskId: source.id,
                mode: thin ? pb.CloneMode.CLONE_MODE_THIN : pb.CloneMode.CLONE_MODE_FULL,
                targetStorageDomainId: thin ? '' : domainId,
                description,
              },
              call,
            );
          }
          // A clone of a volume: an independent, collapsed copy.
          return this.api.disks.copyDisk(
            {
              requestId,
              storageDomainId: source.storageDomainId,
              diskId: source.id,
              targetStorageDomainId: domainId,
              collapse: true,
              targetFormat: params.format,
              description,
            },
            call,
          );
        },
        call,
      );
    }
    disk = await this.grow(disk, size, call);
    return { volume: this.volumeMessage(disk, req.volumeContentSource) };
  }

  async deleteVolume(req: csi.DeleteVolumeRequest, call: CallOptions): Promise<csi.DeleteVolumeResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    const r = parseId(req.volumeId);
    const d = r && (await findDisk(this.api, r.domainId, r.diskId, call));
    if (!d || d.template) return {}; // gone already (or never ours): deleted, as CSI wants
    // A disk the driver did not create (no csi-volume label) is someone else's: a PV naming it must not delete it.
    if (parseLabel(d.description)?.kind !== 'csi-volume') {
      throw failedPrecondition(`disk ${req.volumeId} was not created by ${DRIVER_NAME}: delete it through the sdmesh API if it is no longer needed`);
    }
    const nodes = (await this.publishedNodes(call, r)).get(d.id) ?? [];
    if (nodes.length) throw failedPrecondition(`volume ${req.volumeId} is published to ${nodes.join(', ')}: unpublish it first`, Reason.DISK_PUBLISHED);
    await this.deleteDisk(d, call);
    return {};
  }

  private async deleteDisk(d: pb.Disk, call: CallOptions): Promise<void> {
    try {
      const op = await this.api.disks.deleteDisk({ requestId: `csi-delete-${d.id}`, storageDomainId: d.storageDomainId, diskId: d.id }, call);
      await waitDone(this.api, op, call);
    } catch (err) {
      if (isNotFound(err)) return;
      throw err;
    }
  }

  async validateVolumeCapabilities(req: csi.ValidateVolumeCapabilitiesRequest, call: CallOptions): Promise<csi.ValidateVolumeCapabilitiesResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    if (req.volumeCapabilities.length === 0) throw invalidArgument('volume_capabilities is required');
    await this.volume(req.volumeId, call);
    const why = req.volumeCapabilities.map(unsupported).find(Boolean);
    if (why) return { confirmed: undefined, message: why };
    return {
      confirmed: {
        volumeContext: req.volumeContext,
        volumeCapabilities: req.volumeCapabilities,
        parameters: req.parameters,
        mutableParameters: req.mutableParameters,
      },
      message: '',
    };
  }

  async listVolumes(req: csi.ListVolumesRequest, call: CallOptions): Promise<csi.ListVolumesResponse> {
    const { disks, next } = await this.page(req.startingToken, req.maxEntries, (d) => !d.template && parseLabel(d.description)?.kind !== 'csi-snapshot', call);
    const published = await this.publishedNodes(call);
    return {
      entries: disks.map((d) => ({ volume: this.volumeMessage(d), status: { publishedNodeIds: published.get(d.id) ?? [], volumeCondition: condition(d) } })),
      nextToken: next,
    };
  }

  async controllerGetVolume(req: csi.ControllerGetVolumeRequest, call: CallOptions): Promise<csi.ControllerGetVolumeResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    const d = await this.volume(req.volumeId, call);
    const published = await this.publishedNodes(call, ref(d));
    return { volume: this.volumeMessage(d), status: { publishedNodeIds: published.get(d.id) ?? [], volumeCondition: condition(d) } };
  }

  /** Free bytes above the critical reserve: of the named domain, or the largest of the topology's (a volume lives in one domain). */
  async getCapacity(req: csi.GetCapacityRequest, call: CallOptions): Promise<csi.GetCapacityResponse> {
    if (req.volumeCapabilities.some((c) => unsupported(c))) return { availableCapacity: 0, maximumVolumeSize: undefined, minimumVolumeSize: undefined };
    const params = parseParameters(req.parameters);
    let ids = params.domain ? [params.domain] : undefined;
    if (req.accessibleTopology) {
      const reach = topologyDomains(req.accessibleTopology.segments);
      ids = ids ? ids.filter((id) => reach.includes(id)) : reach;
    }
    const domains = (await this.allDomains(call)).filter((d) => d.status === pb.DomainStatus.DOMAIN_STATUS_ACTIVE && (!ids || ids.includes(d.id)));
    const available = Math.max(0, ...domains.map((d) => d.freeBytes - d.criticalFreeBytes));
    return { availableCapacity: available, maximumVolumeSize: undefined, minimumVolumeSize: undefined };
  }

  async controllerExpandVolume(req: csi.ControllerExpandVolumeRequest, call: CallOptions): Promise<csi.ControllerExpandVolumeResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    if (!req.capacityRange) throw invalidArgument('capacity_range is required');
    if (req.volumeCapability) checkCapabilities([req.volumeCapability], 'volume_capability');
    const d = await this.volume(req.volumeId, call);
    const size = sizeFor(req.capacityRange, d.capacityBytes);
    if (size > d.capacityBytes && ((await this.publishedNodes(call, ref(d))).get(d.id) ?? []).length > 0) {
      // Online: the node's storage daemon holds the leaf's lease, so ExtendDisk can't take it; the
      // node grows the image as the lease holder (NodeExpandVolume). The record's capacity lags
      // until an ExtendDisk to that size runs unpublished (docs/csi.md).
      return { capacityBytes: size, nodeExpansionRequired: true };
    }
    const grown = await this.grow(d, size, call);
    // The node grows its view: the loop device and, for a file system, the file system.
    return { capacityBytes: grown.capacityBytes, nodeExpansionRequired: true };
  }

  // ------------------------------------------------------------------ publish

  async controllerPublishVolume(req: csi.ControllerPublishVolumeRequest, call: CallOptions): Promise<csi.ControllerPublishVolumeResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    if (!req.nodeId) throw invalidArgument('node_id is required');
    if (!req.volumeCapability) throw invalidArgument('volume_capability is required');
    checkCapabilities([req.volumeCapability], 'volume_capability');
    const d = await this.volume(req.volumeId, call);
    const policy = accessPolicy(req.volumeCapability, req.readonly);
    // The node's NodeGetInfo limit. Best effort: two publishes of different disks racing to a full
    // node may both pass (the records are per disk); Kubernetes keeps to the limit itself (CSINode).
    const onNode = (await this.api.attachments.listDiskAttachments({ storageDomainId: '', diskId: '', host: req.nodeId }, call)).attachments;
    if (!onNode.some((a) => a.diskId === d.id) && onNode.length >= MAX_VOLUMES_PER_NODE) {
      throw resourceExhausted(`node ${req.nodeId} has ${onNode.length} volumes published, its limit (max_volumes_per_node ${MAX_VOLUMES_PER_NODE})`);
    }
    const a = await this.api.attachments.publishDisk(
      { storageDomainId: d.storageDomainId, diskId: d.id, host: req.nodeId, mode: policy.mode, readonly: policy.readonly },
      call,
    );
    return {
      publishContext: {
        domainId: a.storageDomainId,
        diskId: a.diskId,
        leafVolumeId: a.leafVolumeId,
        generation: String(a.generation),
        access: a.mode === pb.AttachmentMode.ATTACHMENT_MODE_SHARED ? 'shared' : 'exclusive',
        readonly: String(a.readonly),
      },
    };
  }

  async controllerUnpublishVolume(req: csi.ControllerUnpublishVolumeRequest, call: CallOptions): Promise<csi.ControllerUnpublishVolumeResponse> {
    if (!req.volumeId) throw invalidArgument('volume_id is required');
    const r = parseId(req.volumeId);
    if (!r) return {}; // not ours: nothing is published
    try {
      await this.api.attachments.unpublishDisk({ storageDomainId: r.domainId, diskId: r.diskId, host: req.nodeId }, call);
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
    return {};
  }

  // ------------------------------------------------------------------ snapshots

  async createSnapshot(req: csi.CreateSnapshotRequest, call: CallOptions): Promise<csi.CreateSnapshotResponse> {
    const name = checkCsiName(req.name);
    if (!req.sourceVolumeId) throw invalidArgument('source_volume_id is required');
    const nh = nameHash(name);
    let snap = (
      await this.findLabelled((desc) => {
        const l = parseLabel(desc);
        return l?.kind === 'csi-snapshot' && l.nameHash === nh;
      }, call)
    )[0];
    const src = parseId(req.sourceVolumeId);
    if (snap) {
      const l = parseLabel(snap.description);
      if (l?.kind !== 'csi-snapshot' || !src || l.sourceDiskId !== src.diskId || snap.storageDomainId !== src.domainId) {
        throw alreadyExists(`snapshot "${name.slice(0, 64)}" exists (${formatId(ref(snap))}) of another volume`);
      }
    } else {
      const source = await this.volume(req.sourceVolumeId, call);
      // The copy reads under the volume's lease taken shared: a node's exclusive lease refuses it.
      const { attachments } = await this.api.attachments.listDiskAttachments({ storageDomainId: source.storageDomainId, diskId: source.id, host: '' }, call);
      const exclusive = attachments.find((a) => a.mode === pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE);
      if (exclusive) {
        throw failedPrecondition(
          `volume ${req.sourceVolumeId} is published exclusively to ${exclusive.host}: a snapshot is taken while no node holds it (unpublish it, or retry later)`,
          Reason.DISK_PUBLISHED,
        );
      }
      // A full, collapsed copy in the source's domain: independent of the volume from then on.
      snap = await this.createNamed(
        'snapshot',
        name,
        undefined,
        (requestId) =>
          this.api.disks.copyDisk(
            {
              requestId,
              storageDomainId: source.storageDomainId,
              diskId: source.id,
              targetStorageDomainId: source.storageDomainId,
              collapse: true,
              description: snapshotLabel(name, source.id),
            },
            call,
          ),
        call,
      );
    }
    if (!snap.template && isLegal(snap)) {
      const op = await this.api.disks.markDiskTemplate({ requestId: `csi-template-${snap.id}`, storageDomainId: snap.storageDomainId, diskId: snap.id }, call);
      await waitDone(this.api, op, call);
      snap = (await findDisk(this.api, snap.storageDomainId, snap.id, call)) ?? snap;
    }
    return { snapshot: this.snapshotMessage(snap) };
  }

  async deleteSnapshot(req: csi.DeleteSnapshotRequest, call: CallOptions): Promise<csi.DeleteSnapshotResponse> {
    if (!req.snapshotId) throw invalidArgument('snapshot_id is required');
    const r = parseId(req.snapshotId);
    const d = r && (await findDisk(this.api, r.domainId, r.diskId, call));
    if (!d || parseLabel(d.description)?.kind !== 'csi-snapshot') return {}; // gone (or not a snapshot of ours)
    // Thin restores still backed by it: FAILED_PRECONDITION TEMPLATE_HAS_CLONES ("snapshot in use").
    await this.deleteDisk(d, call);
    return {};
  }

  async listSnapshots(req: csi.ListSnapshotsRequest, call: CallOptions): Promise<csi.ListSnapshotsResponse> {
    if (req.snapshotId) {
      const r = parseId(req.snapshotId);
      const d = r && (await findDisk(this.api, r.domainId, r.diskId, call));
      const ok = d && d.template && parseLabel(d.description)?.kind === 'csi-snapshot';
      const matches = ok && (!req.sourceVolumeId || this.snapshotMessage(d).sourceVolumeId === req.sourceVolumeId);
      return { entries: matches ? [{ snapshot: this.snapshotMessage(d) }] : [], nextToken: '' };
    }
    const src = req.sourceVolumeId ? parseId(req.sourceVolumeId) : undefined;
    if (req.sourceVolumeId && !src) return { entries: [], nextToken: '' };
    const { disks, next } = await this.page(
      req.startingToken,
      req.maxEntries,
      (d) => {
        const l = parseLabel(d.description);
        return d.template && l?.kind === 'csi-snapshot' && (!src || (l.sourceDiskId === src.diskId && d.storageDomainId === src.domainId));
      },
      call,
    );
    return { entries: disks.map((d) => ({ snapshot: this.snapshotMessage(d) })), nextToken: next };
  }
}

const notOffered = (what: string) => async (): Promise<never> => {
  throw new SdmeshError(GrpcStatus.UNIMPLEMENTED, `${what} is not offered by csi.sdmesh.io (not in ControllerGetCapabilities)`, Reason.UNIMPLEMENTED);
};

export async function createControllerService(ctx: PluginContext): Promise<{ service: RegisteredService; stop(): Promise<void> }> {
  const api = connectScheduler(ctx.schedulerAddress, ctx.tls);
  const c = new CsiController(api);
  const opts = (cc: CallContext) => callOptions(cc);
  return {
    service: service(csi.ControllerDefinition, {
      createVolume: (req, cc) => c.createVolume(req, opts(cc)),
      deleteVolume: (req, cc) => c.deleteVolume(req, opts(cc)),
      controllerPublishVolume: (req, cc) => c.controllerPublishVolume(req, opts(cc)),
      controllerUnpublishVolume: (req, cc) => c.controllerUnpublishVolume(req, opts(cc)),
      validateVolumeCapabilities: (req, cc) => c.validateVolumeCapabilities(req, opts(cc)),
      listVolumes: (req, cc) => c.listVolumes(req, opts(cc)),
      getCapacity: (req, cc) => c.getCapacity(req, opts(cc)),
      controllerGetCapabilities: async () => ({ capabilities: CONTROLLER_CAPABILITIES.map((type) => ({ type: { $case: 'rpc', rpc: { type } } })) }),
      createSnapshot: (req, cc) => c.createSnapshot(req, opts(cc)),
      deleteSnapshot: (req, cc) => c.deleteSnapshot(req, opts(cc)),
      listSnapshots: (req, cc) => c.listSnapshots(req, opts(cc)),
      getSnapshot: notOffered('GetSnapshot'),
      controllerExpandVolume: (req, cc) => c.controllerExpandVolume(req, opts(cc)),
      controllerGetVolume: (req, cc) => c.controllerGetVolume(req, opts(cc)),
      controllerModifyVolume: notOffered('ControllerModifyVolume'),
    }),
    stop: async () => api.close(),
  };
}
