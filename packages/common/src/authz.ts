import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { SdmeshError } from './errors';
import { describeIdentity, isValidIdentityName, type Identity } from './identity';
import { Reason } from './reasons';

/**
 * Who may call what: one declared table for every sdmesh gRPC method (DESIGN.md "Trust").
 *
 * Rules:
 * - `scheduler`: a scheduler replica's certificate.
 * - `host-lease-manager`: any host's lease-manager certificate (heartbeats); the handler then
 *   checks that the host in the request is the host in the certificate.
 * - `local`: a process of this host on the lease-manager's unix socket (SO_PEERCRED).
 * - `viewer` < `operator` < `admin`: user certificates, by the role the scheduler's roles file gives them.
 *
 * A method missing from the table is refused for everyone (deny by default); a unit test
 * checks that every method of every service definition is listed.
 */
export const ROLES = ['viewer', 'operator', 'admin'] as const;
export type Role = (typeof ROLES)[number];
export type Rule = 'scheduler' | 'host-lease-manager' | 'local' | Role;

export interface MethodPolicy {
  allow: readonly Rule[];
  /** Written to the audit log (who, method, target, outcome). */
  mutates: boolean;
}

const read = (...allow: Rule[]): MethodPolicy => ({ allow, mutates: false });
const write = (...allow: Rule[]): MethodPolicy => ({ allow, mutates: true });

export const METHOD_POLICIES: Readonly<Record<string, MethodPolicy>> = {
  // Public API (scheduler).
  'sdmesh.v1.StorageDomainService/CreateStorageDomain': write('admin'),
  'sdmesh.v1.StorageDomainService/GetStorageDomain': read('viewer'),
  'sdmesh.v1.StorageDomainService/ListStorageDomains': read('viewer'),
  'sdmesh.v1.StorageDomainService/RemoveStorageDomain': write('admin'),
  'sdmesh.v1.StorageDomainService/AttachStorageDomain': write('admin'),
  'sdmesh.v1.StorageDomainService/DeactivateStorageDomain': write('admin'),
  'sdmesh.v1.StorageDomainService/ActivateStorageDomain': write('admin'),
  'sdmesh.v1.DiskService/CreateDisk': write('operator'),
  'sdmesh.v1.DiskService/GetDisk': read('viewer'),
  'sdmesh.v1.DiskService/ListDisks': read('viewer'),
  'sdmesh.v1.DiskService/DeleteDisk': write('operator'),
  'sdmesh.v1.DiskService/SnapshotDisk': write('operator'),
  'sdmesh.v1.DiskService/DeleteSnapshot': write('operator'),
  'sdmesh.v1.DiskService/CopyDisk': write('operator'),
  'sdmesh.v1.DiskService/MoveDisk': write('operator'),
  'sdmesh.v1.DiskService/ImportDisk': write('admin'),
  'sdmesh.v1.DiskService/ExtendDisk': write('operator'),
  'sdmesh.v1.DiskService/SparsifyDisk': write('operator'),
  'sdmesh.v1.DiskService/AmendDisk': write('operator'),
  'sdmesh.v1.DiskService/AddDiskBitmap': write('operator'),
  'sdmesh.v1.DiskService/RemoveDiskBitmap': write('operator'),
  'sdmesh.v1.DiskService/ClearDiskBitmaps': write('operator'),
  'sdmesh.v1.DiskService/ListDiskBitmaps': read('viewer'),
  'sdmesh.v1.DiskService/MarkDiskTemplate': write('operator'),
  'sdmesh.v1.DiskService/CloneDisk': write('operator'),
  'sdmesh.v1.HostService/ListHosts': read('viewer'),
  'sdmesh.v1.HostService/GetHost': read('viewer'),
  'sdmesh.v1.HostService/Heartbeat': write('host-lease-manager'),
  'sdmesh.v1.HostService/StartHostMaintenance': write('admin'),
  'sdmesh.v1.HostService/ActivateHost': write('admin'),
  // Image transfer: the URL (with its ticket) only goes to the user who started it (the handler checks).
  'sdmesh.v1.ImageTransferService/StartImageTransfer': write('operator'),
  'sdmesh.v1.ImageTransferService/GetImageTransfer': read('viewer'),
  'sdmesh.v1.ImageTransferService/FinalizeImageTransfer': write('operator'),
  'sdmesh.v1.ImageTransferService/CancelImageTransfer': write('operator'),
  'sdmesh.v1.DiskAttachmentService/PublishDisk': write('operator'),
  'sdmesh.v1.DiskAttachmentService/UnpublishDisk': write('operator'),
  'sdmesh.v1.DiskAttachmentService/ListDiskAttachments': read('viewer'),
  'sdmesh.v1.OperationService/GetOperation': read('viewer'),
  'sdmesh.v1.OperationService/ListOperations': read('viewer'),
  'sdmesh.v1.OperationService/CancelOperation': write('operator'),
  'sdmesh.v1.OperationService/WaitOperation': read('viewer'),
  'sdmesh.v1.OperationService/WatchOperation': read('viewer'),

  // metadata-tx, data-mover, gc: steps the scheduler runs on a host.
  'sdmesh.v1.MetadataTxService/FormatDomain': write('scheduler'),
  'sdmesh.v1.MetadataTxService/GetDomain': read('scheduler'),
  'sdmesh.v1.MetadataTxService/CreateVolume': write('scheduler'),
  'sdmesh.v1.MetadataTxService/DeleteVolume': write('scheduler'),
  'sdmesh.v1.MetadataTxService/DeleteImage': write('scheduler'),
  'sdmesh.v1.MetadataTxService/UpdateVolume': write('scheduler'),
  'sdmesh.v1.MetadataTxService/FinalizeMerge': write('scheduler'),
  'sdmesh.v1.MetadataTxService/MarkTemplate': write('scheduler'),
  'sdmesh.v1.MetadataTxService/ListImages': read('scheduler'),
  'sdmesh.v1.MetadataTxService/ListVolumes': read('scheduler'),
  'sdmesh.v1.MetadataTxService/GetVolume': read('scheduler'),
  'sdmesh.v1.MetadataTxService/AcquireSpmLease': write('scheduler'),
  'sdmesh.v1.MetadataTxService/FenceOperation': write('scheduler'),
  'sdmesh.v1.DataMoverService/CopyVolume': write('scheduler'),
  'sdmesh.v1.DataMoverService/GetJob': read('scheduler'),
  'sdmesh.v1.DataMoverService/ListJobs': read('scheduler'),
  'sdmesh.v1.DataMoverService/AbortJob': write('scheduler'),
  'sdmesh.v1.DataMoverService/WatchJob': read('scheduler'),
  'sdmesh.v1.DataMoverService/ChecksumVolume': read('scheduler'),
  'sdmesh.v1.DataMoverService/GetHostLoad': read('scheduler'),
  'sdmesh.v1.DataMoverService/InspectFile': read('scheduler'),
  'sdmesh.v1.DataMoverService/StartVolumeJob': write('scheduler'),
  'sdmesh.v1.DataMoverService/OpenTransfer': write('scheduler'),
  'sdmesh.v1.DataMoverService/GetTransfer': read('scheduler'),
  'sdmesh.v1.DataMoverService/CloseTransfer': write('scheduler'),
  'sdmesh.v1.GcService/CollectGarbage': write('scheduler'),
  'sdmesh.v1.GcService/GetGcStatus': read('scheduler'),
  'sdmesh.v1.GcService/ListGarbage': read('scheduler'),

  // lease-manager: leases and formatting only for this host's processes; liveness and
  // lockspace membership also for the scheduler.
  'sdmesh.v1.LeaseManagerService/FormatLockspace': write('local'),
  'sdmesh.v1.LeaseManagerService/FormatLeases': write('local'),
  'sdmesh.v1.LeaseManagerService/AcquireLease': write('local'),
  'sdmesh.v1.LeaseManagerService/AcquireLeases': write('local'),
  'sdmesh.v1.LeaseManagerService/ReleaseLease': write('local'),
  'sdmesh.v1.LeaseManagerService/JoinLockspace': write('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/LeaveLockspace': write('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/GetLockspace': read('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/ListLockspaces': read('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/ListLockspaceHosts': read('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/ListHeldLeases': read('local', 'scheduler'),
  'sdmesh.v1.LeaseManagerService/GetLeaseOwner': read('local', 'scheduler'),

  // CSI plugins (services/csi): served only on the CSI unix socket, to this host's processes
  // (kubelet, the CSI sidecars). What they may do to storage is bounded by the plugin's own
  // certificate at the scheduler.
  'csi.v1.Identity/GetPluginInfo': read('local'),
  'csi.v1.Identity/GetPluginCapabilities': read('local'),
  'csi.v1.Identity/Probe': read('local'),
  'csi.v1.Controller/CreateVolume': write('local'),
  'csi.v1.Controller/DeleteVolume': write('local'),
  'csi.v1.Controller/ControllerPublishVolume': write('local'),
  'csi.v1.Controller/ControllerUnpublishVolume': write('local'),
  'csi.v1.Controller/ValidateVolumeCapabilities': read('local'),
  'csi.v1.Controller/ListVolumes': read('local'),
  'csi.v1.Controller/GetCapacity': read('local'),
  'csi.v1.Controller/ControllerGetCapabilities': read('local'),
  'csi.v1.Controller/CreateSnapshot': write('local'),
  'csi.v1.Controller/DeleteSnapshot': write('local'),
  'csi.v1.Controller/ListSnapshots': read('local'),
  'csi.v1.Controller/GetSnapshot': read('local'),
  'csi.v1.Controller/ControllerExpandVolume': write('local'),
  'csi.v1.Controller/ControllerGetVolume': read('local'),
  'csi.v1.Controller/ControllerModifyVolume': write('local'),
  'csi.v1.Node/NodeStageVolume': write('local'),
  'csi.v1.Node/NodeUnstageVolume': write('local'),
  'csi.v1.Node/NodePublishVolume': write('local'),
  'csi.v1.Node/NodeUnpublishVolume': write('local'),
  'csi.v1.Node/NodeGetVolumeStats': read('local'),
  'csi.v1.Node/NodeExpandVolume': write('local'),
  'csi.v1.Node/NodeGetCapabilities': read('local'),
  'csi.v1.Node/NodeGetInfo': read('local'),
};

/** Refusals carry one of these reasons (label of sdmesh_grpc_auth_denied_total). */
export type DenyReason = Reason;

export class AuthDenied extends SdmeshError {
  constructor(
    code: grpc.status,
    message: string,
    readonly denyReason: DenyReason,
  ) {
    super(code, message, denyReason);
  }
}

/** Roles of user identities, from a JSON file `{"users": {"<name>": "viewer|operator|admin"}}`, re-read when it changes. */
export class RolesFile {
  private roles = new Map<string, Role>();
  private stamp = '';
  private checkedAt = 0;

  constructor(
    readonly path: string,
    private readonly recheckMs = 2000,
  ) {
    this.load(true);
  }

  /** Parses a roles document; throws with a message naming the bad entry. */
  static parse(text: string, where: string): Map<string, Role> {
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (err) {
      throw new Error(`${where}: not JSON (${(err as Error).message})`);
    }
    const users = (doc as { users?: unknown }).users;
    if (!users || typeof users !== 'object' || Array.isArray(users)) throw new Error(`${where}: expected {"users": {"<name>": "viewer|operator|admin"}}`);
    const out = new Map<string, Role>();
    for (const [name, role] of Object.entries(users as Record<string, unknown>)) {
      if (!isValidIdentityName(name)) throw new Error(`${where}: user name "${name}" is not valid (letters, digits, . _ -)`);
      if (!ROLES.includes(role as Role)) throw new Error(`${where}: user "${name}" has role "${String(role)}"; roles are ${ROLES.join(', ')}`);
      out.set(name, role as Role);
    }
    return out;
  }

  private load(initial: boolean): void {
    try {
      const st = fs.statSync(this.path);
      const stamp = `${st.ino}:${st.size}:${st.mtimeMs}`;
      if (stamp === this.stamp) return;
      this.roles = RolesFile.parse(fs.readFileSync(this.path, 'utf8'), this.path);
      this.stamp = stamp;
    } catch (err) {
      if (initial) throw err;
      // A broken edit keeps the last good table: refusing everyone would be an outage.
    }
  }

  roleOf(name: string): Role | undefined {
    const now = Date.now();
    if (now - this.checkedAt >= this.recheckMs) {
      this.checkedAt = now;
      this.load(false);
    }
    return this.roles.get(name);
  }
}

const roleRank = (r: Role) => ROLES.indexOf(r);

/**
 * Checks calls against METHOD_POLICIES. `insecure` (the --insecure opt-out) lets every TCP
 * caller through except to host-local methods, which stay reachable only on the unix socket.
 */
export class Authorizer {
  constructor(private readonly opts: { insecure: boolean; roles?: RolesFile }) {}

  policy(method: string): MethodPolicy | undefined {
    return METHOD_POLICIES[method];
  }

  /** Throws AuthDenied, or returns the policy of the method. */
  check(method: string, identity: Identity | undefined): MethodPolicy {
    const policy = METHOD_POLICIES[method];
    if (!policy) throw new AuthDenied(grpc.status.PERMISSION_DENIED, `${method} is not in sdmesh's authorization table`, Reason.UNKNOWN_METHOD);
    if (!identity) throw unauthenticated(method);
    if (identity.kind === 'insecure') {
      if (policy.allow.every((r) => r === 'local')) {
        throw new AuthDenied(
          grpc.status.PERMISSION_DENIED,
          `${method} is served only to this host's processes on the lease-manager's unix socket`,
          Reason.NOT_LOCAL,
        );
      }
      return policy;
    }
    if (policy.allow.some((rule) => this.matches(rule, identity))) return policy;
    if (policy.allow.every((r) => r === 'local')) {
      throw new AuthDenied(
        grpc.status.PERMISSION_DENIED,
        `${method} is served only to this host's processes on the lease-manager's unix socket, not to ${describeIdentity(identity)}`,
        Reason.NOT_LOCAL,
      );
    }
    const roles = policy.allow.filter((r): r is Role => (ROLES as readonly string[]).includes(r));
    if (identity.kind === 'user' && roles.length) {
      const has = this.opts.roles?.roleOf(identity.name);
      const need = roles.sort((a, b) => roleRank(a) - roleRank(b))[0]!;
      throw new AuthDenied(
        grpc.status.PERMISSION_DENIED,
        `${method} needs role ${need}; user "${identity.name}" has ${has ? `role ${has}` : 'no role in the roles file'}`,
        Reason.MISSING_ROLE,
      );
    }
    throw new AuthDenied(
      grpc.status.PERMISSION_DENIED,
      `${method} may not be called by ${describeIdentity(identity)} (allowed: ${policy.allow.join(', ')})`,
      Reason.WRONG_IDENTITY,
    );
  }

  private matches(rule: Rule, id: Identity): boolean {
    switch (rule) {
      case 'scheduler':
        return id.kind === 'scheduler';
      case 'host-lease-manager':
        return id.kind === 'host' && id.service === 'lease-manager';
      case 'local':
        return id.kind === 'local';
      default: {
        if (id.kind !== 'user') return false;
        const has = this.opts.roles?.roleOf(id.name);
        return has !== undefined && roleRank(has) >= roleRank(rule);
      }
    }
  }
}

export function unauthenticated(method: string): AuthDenied {
  return new AuthDenied(
    grpc.status.UNAUTHENTICATED,
    `${method}: this server requires a client certificate signed by the sdmesh CA (none was presented, or it is untrusted or expired)`,
    Reason.NO_CLIENT_CERTIFICATE,
  );
}

/**
 * What a mutating call acted on, for the audit log: the request's id, name and path fields
 * (one level of nesting, e.g. a lease location's resource), never its whole content.
 */
export function auditTarget(request: unknown): Record<string, string | number> {
  const out: Record<string, string | number> = {};
  const visit = (obj: unknown, prefix: string, depth: number) => {
    if (!obj || typeof obj !== 'object' || depth > 1) return;
    for (const [k, v] of Object.entries(obj as Record<string, unknown>)) {
      if (typeof v === 'object') visit(v, `${prefix}${k}.`, depth + 1);
      else if ((typeof v === 'string' && v !== '') || (typeof v === 'number' && /Pid$/.test(k))) {
        if (/(Id|Name|name|[pP]ath|lockspace|resource|host|Pid)$/.test(k)) out[prefix + k] = typeof v === 'string' ? v.slice(0, 256) : v;
      }
    }
  };
  visit(request, '', 0);
  return out;
}
