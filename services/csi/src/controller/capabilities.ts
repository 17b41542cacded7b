import { csi, invalidArgument, pb } from '@sdmesh/common';

const Mode = csi.VolumeCapability_AccessMode_Mode;

/** File systems the node plugin makes (empty: its default). */
export const FS_TYPES = ['', 'ext4', 'xfs'];

/** What a set of capabilities asks of an attachment. */
export interface AccessPolicy {
  mode: pb.AttachmentMode;
  readonly: boolean;
}

/**
 * Why sdmesh can't honour a capability, or undefined when it can. One host writes a volume
 * (exclusive lease) unless it is raw block shared by several writers that coordinate among
 * themselves (KubeVirt live migration: a shared lease); readers share.
 */
export function unsupported(cap: csi.VolumeCapability | undefined): string | undefined {
  if (!cap) return 'a volume capability is empty';
  const access = cap.accessType;
  if (!access) return 'a volume capability has neither block nor mount';
  if (access.$case === 'mount' && !FS_TYPES.includes(access.mount.fsType)) return `file system "${access.mount.fsType}" is not supported (ext4, xfs)`;
  const mode = cap.accessMode?.mode ?? Mode.UNKNOWN;
  switch (mode) {
    case Mode.SINGLE_NODE_WRITER:
    case Mode.SINGLE_NODE_READER_ONLY:
    case Mode.SINGLE_NODE_SINGLE_WRITER:
    case Mode.SINGLE_NODE_MULTI_WRITER:
    case Mode.MULTI_NODE_READER_ONLY:
      return undefined;
    case Mode.MULTI_NODE_MULTI_WRITER:
      return access.$case === 'block' ? undefined : 'MULTI_NODE_MULTI_WRITER is for raw block volumes only (a file system has one writer)';
    case Mode.MULTI_NODE_SINGLE_WRITER:
      return 'MULTI_NODE_SINGLE_WRITER is not supported (a node writes only under an exclusive lease)';
    default:
      return 'the access mode is missing or unknown';
  }
}

/** Refuses (INVALID_ARGUMENT) an empty list or any capability sdmesh can't honour. */
export function checkCapabilities(caps: readonly (csi.VolumeCapability | undefined)[], field = 'volume_capabilities'): void {
  if (caps.length === 0) throw invalidArgument(`${field} is required`);
  for (const c of caps) {
    const why = unsupported(c);
    if (why) throw invalidArgument(`${field}: ${why}`);
  }
}

/** The attachment one capability needs: multi-node modes share, the others are exclusive. */
export function accessPolicy(cap: csi.VolumeCapability, readonlyFlag: boolean): AccessPolicy {
  const mode = cap.accessMode?.mode ?? Mode.UNKNOWN;
  const shared = mode === Mode.MULTI_NODE_READER_ONLY || mode === Mode.MULTI_NODE_MULTI_WRITER;
  const readerOnly = mode === Mode.MULTI_NODE_READER_ONLY || mode === Mode.SINGLE_NODE_READER_ONLY;
  return {
    mode: shared ? pb.AttachmentMode.ATTACHMENT_MODE_SHARED : pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE,
    readonly: readonlyFlag || readerOnly,
  };
}
