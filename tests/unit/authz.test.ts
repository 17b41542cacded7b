import fs from 'node:fs';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { csi } from '@sdmesh/common';
import { AuthDenied, auditTarget, Authorizer, identityFromSubjectAltName, METHOD_POLICIES, pb, RolesFile, type Identity } from '@sdmesh/common/internal';
import { makeTestDir, removeTestDir } from '../harness/paths';

const SERVICES = [
  pb.StorageDomainServiceDefinition,
  pb.DiskServiceDefinition,
  pb.HostServiceDefinition,
  pb.OperationServiceDefinition,
  pb.ImageTransferServiceDefinition,
  pb.MetadataTxServiceDefinition,
  pb.DataMoverServiceDefinition,
  pb.GcServiceDefinition,
  pb.LeaseManagerServiceDefinition,
  pb.DiskAttachmentServiceDefinition,
  csi.IdentityDefinition,
  csi.ControllerDefinition,
  csi.NodeDefinition,
];

describe('authorization table', () => {
  const dir = makeTestDir('authz');
  const rolesPath = path.join(dir, 'roles.json');
  fs.writeFileSync(rolesPath, JSON.stringify({ users: { ann: 'admin', otto: 'operator', vic: 'viewer' } }));
  const authz = new Authorizer({ insecure: false, roles: new RolesFile(rolesPath, 0) });
  afterAll(() => removeTestDir(dir));

  const verdict = (method: string, id: Identity | undefined) => {
    try {
      authz.check(method, id);
      return 'OK';
    } catch (err) {
      return `${status[(err as AuthDenied).code]}/${(err as AuthDenied).denyReason}`;
    }
  };

  it('lists every method of every sdmesh service, and nothing else', () => {
    const methods = SERVICES.flatMap((def) => Object.values(def.methods).map((m) => `${def.fullName}/${m.name}`)).sort();
    expect(Object.keys(METHOD_POLICIES).sort()).toEqual(methods);
  });

  it.each([
    // method, identity, verdict
    ['sdmesh.v1.DiskService/GetDisk', { kind: 'user', name: 'vic' }, 'OK'],
    ['sdmesh.v1.DiskService/DeleteDisk', { kind: 'user', name: 'vic' }, 'PERMISSION_DENIED/MISSING_ROLE'],
    ['sdmesh.v1.DiskService/DeleteDisk', { kind: 'user', name: 'otto' }, 'OK'],
    ['sdmesh.v1.DiskService/ImportDisk', { kind: 'user', name: 'otto' }, 'PERMISSION_DENIED/MISSING_ROLE'],
    ['sdmesh.v1.DiskService/ImportDisk', { kind: 'user', name: 'ann' }, 'OK'],
    ['sdmesh.v1.DiskService/GetDisk', { kind: 'user', name: 'nobody' }, 'PERMISSION_DENIED/MISSING_ROLE'],
    ['sdmesh.v1.DiskService/GetDisk', { kind: 'scheduler' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.DiskService/GetDisk', undefined, 'UNAUTHENTICATED/NO_CLIENT_CERTIFICATE'],
    ['sdmesh.v1.HostService/Heartbeat', { kind: 'host', host: 'h1', service: 'lease-manager' }, 'OK'],
    ['sdmesh.v1.HostService/Heartbeat', { kind: 'host', host: 'h1', service: 'gc' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.HostService/Heartbeat', { kind: 'user', name: 'ann' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.MetadataTxService/DeleteImage', { kind: 'scheduler' }, 'OK'],
    ['sdmesh.v1.MetadataTxService/DeleteImage', { kind: 'host', host: 'h2', service: 'metadata-tx' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.MetadataTxService/DeleteImage', { kind: 'user', name: 'ann' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.LeaseManagerService/AcquireLease', { kind: 'local', pid: 42, uid: 0 }, 'OK'],
    ['sdmesh.v1.LeaseManagerService/AcquireLease', { kind: 'scheduler' }, 'PERMISSION_DENIED/NOT_LOCAL'],
    ['sdmesh.v1.LeaseManagerService/AcquireLeases', { kind: 'local', pid: 42, uid: 0 }, 'OK'],
    ['sdmesh.v1.LeaseManagerService/AcquireLeases', { kind: 'scheduler' }, 'PERMISSION_DENIED/NOT_LOCAL'],
    ['sdmesh.v1.LeaseManagerService/FormatLockspace', { kind: 'insecure' }, 'PERMISSION_DENIED/NOT_LOCAL'],
    ['sdmesh.v1.LeaseManagerService/GetLeaseOwner', { kind: 'scheduler' }, 'OK'],
    ['sdmesh.v1.LeaseManagerService/GetLeaseOwner', { kind: 'host', host: 'h1', service: 'gc' }, 'PERMISSION_DENIED/WRONG_IDENTITY'],
    ['sdmesh.v1.NoSuchService/Anything', { kind: 'scheduler' }, 'PERMISSION_DENIED/UNKNOWN_METHOD'],
    ['csi.v1.Controller/CreateVolume', { kind: 'local', pid: 42, uid: 0 }, 'OK'],
    ['csi.v1.Controller/CreateVolume', { kind: 'user', name: 'ann' }, 'PERMISSION_DENIED/NOT_LOCAL'],
  ] as Array<[string, Identity | undefined, string]>)('%s as %j: %s', (method, id, expected) => {
    expect(verdict(method, id)).toBe(expected);
  });

  it('--insecure lets TCP callers through, except to host-local methods', () => {
    const open = new Authorizer({ insecure: true });
    expect(() => open.check('sdmesh.v1.DiskService/DeleteDisk', { kind: 'insecure' })).not.toThrow();
    expect(() => open.check('sdmesh.v1.LeaseManagerService/ReleaseLease', { kind: 'insecure' })).toThrow(/unix socket/);
  });

  it('roles are re-read when the file changes, and a broken edit keeps the last good table', () => {
    const roles = new RolesFile(rolesPath, 0);
    expect(roles.roleOf('vic')).toBe('viewer');
    fs.writeFileSync(rolesPath, JSON.stringify({ users: { vic: 'admin' } }));
    expect(roles.roleOf('vic')).toBe('admin');
    fs.writeFileSync(rolesPath, '{ not json');
    expect(roles.roleOf('vic')).toBe('admin');
    expect(() => RolesFile.parse(JSON.stringify({ users: { vic: 'root' } }), 'roles.json')).toThrow(/role "root"; roles are viewer, operator, admin/);
    expect(() => RolesFile.parse(JSON.stringify({ users: { '../x': 'viewer' } }), 'roles.json')).toThrow(/user name "..\/x" is not valid/);
  });

  it('identities come from exactly one sdmesh URI SAN', () => {
    expect(identityFromSubjectAltName('URI:sdmesh://scheduler, DNS:localhost')).toEqual({ kind: 'scheduler' });
    expect(identityFromSubjectAltName('URI:sdmesh://host/h1/metadata-tx')).toEqual({ kind: 'host', host: 'h1', service: 'metadata-tx' });
    expect(identityFromSubjectAltName('URI:sdmesh://host/h1/shell')).toBeUndefined();
    expect(identityFromSubjectAltName('URI:sdmesh://user/a, URI:sdmesh://scheduler')).toBeUndefined();
    expect(identityFromSubjectAltName('DNS:scheduler')).toBeUndefined();
    expect(identityFromSubjectAltName(undefined)).toBeUndefined();
  });

  it('the audit target names what a call acted on, not its content', () => {
    expect(auditTarget({ requestId: 'r1', storageDomainId: 'd1', diskId: 'k1', capacityBytes: 5, description: 'secret text' })).toEqual({
      requestId: 'r1',
      storageDomainId: 'd1',
      diskId: 'k1',
    });
    expect(auditTarget({ lease: { lockspace: 'ls', resource: 'r', path: '/p', offset: 0 }, holderPid: 7 })).toEqual({
      'lease.lockspace': 'ls',
      'lease.resource': 'r',
      'lease.path': '/p',
      holderPid: 7,
    });
  });
});
