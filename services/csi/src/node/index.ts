import fs from 'node:fs';
import path from 'node:path';
import {
  csi,
  failedPrecondition,
  invalidArgument,
  LeaseHolder,
  notFound,
  roundUpToSector,
  SdmeshError,
  service,
  unavailable,
  type RegisteredService,
} from '@sdmesh/common';
import { status } from '@grpc/grpc-js';
import { domainTopologyKey, type PluginContext } from '../plugin';
import { Attacher, leaseModeOf, type StageSpec } from './attacher';
import { blockDeviceSize, fileSystemUsage, programAvailable, SUPPORTED_FS, type FsType } from './host-tools';
import { NodeState, type StagedVolume } from './state';
import { reachableDomains } from './volumes';

/** Loop devices per host are plenty; this bounds what the scheduler puts on one node. */
export const MAX_VOLUMES_PER_NODE = 128;

const RPC = csi.NodeServiceCapability_RPC_Type;

const required = (value: string, field: string): string => {
  if (!value) throw invalidArgument(`${field} is required`);
  return value;
};

const requiredPath = (value: string, field: string): string => {
  required(value, field);
  if (!path.isAbsolute(value) || path.normalize(value) !== value.replace(/\/+$/, '') || value.includes('\0')) {
    throw invalidArgument(`${field} must be an absolute, normalized path, got "${value}"`);
  }
  return value.replace(/\/+$/, '');
};

/** A volume_path as given: only an empty one is a bad argument; any other path than where the volume is staged or published is NOT_FOUND (the spec's answer). */
const givenVolumePath = (value: string): string => required(value, 'volume_path').replace(/(.)\/+$/, '$1');

function accessOf(cap: csi.VolumeCapability | undefined): {
  access: 'block' | 'mount';
  fsType: FsType | '';
  mountFlags: string[];
  mode: csi.VolumeCapability_AccessMode_Mode;
} {
  if (!cap) throw invalidArgument('volume_capability is required');
  if (!cap.accessType) throw invalidArgument('volume_capability.access_type (block or mount) is required');
  if (!cap.accessMode) throw invalidArgument('volume_capability.access_mode is required');
  if (cap.accessType.$case === 'block') return { access: 'block', fsType: '', mountFlags: [], mode: cap.accessMode.mode };
  const fsType = cap.accessType.mount.fsType;
  if (fsType && !(SUPPORTED_FS as readonly string[]).includes(fsType)) {
    throw invalidArgument(`fs_type "${fsType}" is not supported: use ${SUPPORTED_FS.join(' or ')}`);
  }
  if (fsType === 'xfs' && !programAvailable('mkfs.xfs'))
    throw invalidArgument('fs_type "xfs" is not available on this node (no mkfs.xfs: xfsprogs is not installed); use ext4');
  return { access: 'mount', fsType: fsType as FsType | '', mountFlags: cap.accessType.mount.mountFlags, mode: cap.accessMode.mode };
}

function generationOf(publishContext: Record<string, string>): number | undefined {
  const g = publishContext.generation;
  if (g === undefined || g === '') return undefined;
  if (!/^\d{1,15}$/.test(g)) throw invalidArgument(`publish_context generation "${g}" is not a generation number`);
  return Number(g);
}

/**
 * The CSI Node service (services/csi/src/node): attaches sdmesh disks on this host through a
 * per-volume qemu-storage-daemon that holds the disk's sanlock leases as its own pid
 * (docs/csi.md, "Node"). The plugin registers with sanlock itself only to notice when the daemon
 * dies: it then SIGKILLs every storage daemon (nobody else can fence them without a watchdog),
 * reports their volumes abnormal and attaches nothing more until it is restarted.
 */
export async function createNodeService(ctx: PluginContext): Promise<{ service: RegisteredService; stop(): Promise<void> }> {
  const log = ctx.log;
  const state = new NodeState(ctx.stateDir);
  const leaseManagerAddress = ctx.leaseManagerAddress.startsWith('unix:') ? ctx.leaseManagerAddress : `unix:${ctx.leaseManagerAddress}`;
  // Set once the attacher exists; the registration must come first (the attacher acquires through it).
  let killExports = () => undefined as void;
  /** Why this node can't attach any more (its sanlock daemon went away), or ''. */
  let fenced = '';
  const holder = await LeaseHolder.register({
    leaseManagerAddress,
    log,
    // The plugin stays up, so NodeGetVolumeStats reports the fenced volumes abnormal; it attaches
    // nothing more until it is restarted (and registers with the new sanlock daemon).
    onFence: (why) => {
      fenced = why;
      log.fatal({ why }, 'sanlock is gone: killing every storage daemon of this node');
      killExports();
    },
  });
  const a = new Attacher(state, holder, log);
  killExports = () => a.fenceAll();
  await a.adopt();

  const statsOf = async (record: StagedVolume, volumePath: string): Promise<csi.NodeGetVolumeStatsResponse> => {
    const problem = a.condition(record);
    const volumeCondition = { abnormal: problem !== '', message: problem || 'healthy' };
    if (problem) return { usage: [], volumeCondition };
    if (record.access === 'block') {
      const total = await blockDeviceSize(record.loopDevice);
      return { usage: [{ unit: csi.VolumeUsage_Unit.BYTES, total, available: 0, used: 0 }], volumeCondition };
    }
    const u = await fileSystemUsage(volumePath);
    return {
      usage: [
        { unit: csi.VolumeUsage_Unit.BYTES, total: u.total, available: u.available, used: u.used },
        { unit: csi.VolumeUsage_Unit.INODES, total: u.inodes, available: u.inodesFree, used: u.inodes - u.inodesFree },
      ],
      volumeCondition,
    };
  };

  /** The staged volume whose staging path or a published target is `volumePath`. */
  const stagedAt = (volumeId: string, volumePath: string): StagedVolume => {
    const record = a.staged(volumeId);
    if (!record) throw notFound(`volume ${volumeId} is not staged on node ${ctx.nodeId}`);
    if (record.stagingPath !== volumePath && !(volumePath in record.published)) {
      throw notFound(`volume ${volumeId} is not staged or published at ${volumePath} on node ${ctx.nodeId}`);
    }
    if (!fs.existsSync(volumePath)) throw notFound(`volume path ${volumePath} does not exist`);
    return record;
  };

  return {
    service: service(csi.NodeDefinition, {
      nodeStageVolume: async (req) => {
        if (fenced) throw unavailable(`node ${ctx.nodeId} lost its sanlock daemon (${fenced}): restart the node plugin once sanlock runs again`);
        const volumeId = required(req.volumeId, 'volume_id');
        const stagingPath = requiredPath(req.stagingTargetPath, 'staging_target_path');
        const cap = accessOf(req.volumeCapability);
        const lease = leaseModeOf(cap.mode, cap.access);
        const spec: StageSpec = {
          volumeId,
          stagingPath,
          access: cap.access,
          fsType: cap.fsType,
          mountFlags: cap.mountFlags,
          readOnly: lease.readOnly,
          sharedLease: lease.shared,
          expectedGeneration: generationOf(req.publishContext),
        };
        await a.serialized(volumeId, () => a.stage(spec));
        return {};
      },
      nodeUnstageVolume: async (req) => {
        const volumeId = required(req.volumeId, 'volume_id');
        const stagingPath = requiredPath(req.stagingTargetPath, 'staging_target_path');
        await a.serialized(volumeId, () => a.unstage(volumeId, stagingPath));
        return {};
      },
      nodePublishVolume: async (req) => {
        const volumeId = required(req.volumeId, 'volume_id');
        const stagingPath = requiredPath(req.stagingTargetPath, 'staging_target_path');
        const targetPath = requiredPath(req.targetPath, 'target_path');
        const cap = accessOf(req.volumeCapability);
        leaseModeOf(cap.mode, cap.access);
        await a.serialized(volumeId, () => a.publish(volumeId, stagingPath, targetPath, req.readonly, cap.access));
        return {};
      },
      nodeUnpublishVolume: async (req) => {
        const volumeId = required(req.volumeId, 'volume_id');
        const targetPath = requiredPath(req.targetPath, 'target_path');
        await a.serialized(volumeId, () => a.unpublish(volumeId, targetPath));
        return {};
      },
      nodeGetVolumeStats: async (req) => {
        const volumeId = required(req.volumeId, 'volume_id');
        const volumePath = givenVolumePath(req.volumePath);
        return statsOf(stagedAt(volumeId, volumePath), volumePath);
      },
      nodeExpandVolume: async (req) => {
        const volumeId = required(req.volumeId, 'volume_id');
        const volumePath = givenVolumePath(req.volumePath);
        if (req.volumeCapability) accessOf(req.volumeCapability);
        // Whole 512-byte sectors (what the image and the loop device hold), within limit_bytes; none asked: the
        // file system only catches up with a volume grown elsewhere.
        const range = req.capacityRange;
        const requiredBytes = roundUpToSector(Math.max(range?.requiredBytes ?? 0, 0));
        if (range && range.limitBytes > 0 && requiredBytes > range.limitBytes) {
          throw new SdmeshError(
            status.OUT_OF_RANGE,
            `required_bytes ${range.requiredBytes} (${requiredBytes} in whole 512-byte sectors) exceeds limit_bytes ${range.limitBytes}`,
            'OUT_OF_RANGE',
          );
        }
        const record = stagedAt(volumeId, volumePath);
        if (record.readOnly) {
          // The spec's "volume in use": staged this way it can not be expanded (the caller must not retry).
          throw failedPrecondition(
            `volume ${volumeId} is staged read-only on node ${ctx.nodeId} (its storage daemon exports it read-only, under a shared lease): a read-only volume can not be expanded`,
          );
        }
        const capacityBytes = await a.serialized(volumeId, () => a.expand(volumeId, requiredBytes));
        return { capacityBytes };
      },
      nodeGetCapabilities: async () => ({
        capabilities: [RPC.STAGE_UNSTAGE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER].map((type) => ({
          type: { $case: 'rpc' as const, rpc: { type } },
        })),
      }),
      nodeGetInfo: async () => {
        const domains = await reachableDomains();
        return {
          nodeId: ctx.nodeId,
          maxVolumesPerNode: MAX_VOLUMES_PER_NODE,
          accessibleTopology: { segments: Object.fromEntries(domains.map((d) => [domainTopologyKey(d.id), 'true'])) },
        };
      },
    }),
    stop: async () => {
      // Staged volumes stay attached across a restart of the plugin: only the connections close.
      await holder.close();
    },
  };
}
