import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { createClient, pb, sameIdentity, serverIdentityCheck, TLS_CHANNEL_OPTIONS, type ServiceClient } from '@sdmesh/common';
import { usageError } from './exit';

export interface ConnectionOptions {
  /** host:port of the scheduler. */
  address: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  /** Plaintext, no client certificate: only for a mesh started with --insecure. */
  insecure?: boolean;
}

function readPem(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw usageError(`${what} ${file}: ${(err as Error).message}`);
  }
}

/**
 * Channel credentials: mutual TLS with the mesh CA (--tls-ca) and this user's certificate
 * (--tls-cert/--tls-key); the server must present the scheduler's identity. Plaintext only
 * with --insecure, for a mesh that runs that way.
 */
export function channelCredentials(o: ConnectionOptions): grpc.ChannelCredentials {
  if (o.insecure) return grpc.credentials.createInsecure();
  if (!o.tlsCa || !o.tlsCert || !o.tlsKey) {
    throw usageError(
      'sdmesh needs mutual TLS: give --tls-ca, --tls-cert and --tls-key (or SDMESH_TLS_CA/_CERT/_KEY; `. .sdmesh/sdmctl.env` sets them for the local mesh), or --insecure for a mesh started with --insecure',
    );
  }
  const ca = readPem(o.tlsCa, '--tls-ca');
  const key = readPem(o.tlsKey, '--tls-key');
  const cert = readPem(o.tlsCert, '--tls-cert');
  try {
    return grpc.credentials.createSsl(ca, key, cert, { checkServerIdentity: serverIdentityCheck(sameIdentity({ kind: 'scheduler' })) });
  } catch (err) {
    throw usageError(`TLS: ${(err as Error).message}`);
  }
}

/** The public services of the scheduler (proto/sdmesh/v1/scheduler.proto). */
export interface Api {
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  hosts: ServiceClient<typeof pb.HostServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  transfers: ServiceClient<typeof pb.ImageTransferServiceDefinition>;
  attachments: ServiceClient<typeof pb.DiskAttachmentServiceDefinition>;
  close(): void;
}

const ADDRESS_RE = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$|^(unix|dns|ipv4|ipv6):/;
const IPV4_ADDRESS_RE = /^\d{1,3}(\.\d{1,3}){3}:\d{1,5}$/;
const IPV6_ADDRESS_RE = /^\[[0-9a-fA-F:]+\]:\d{1,5}$/;

/**
 * The gRPC target of --address: one HOST:PORT (or a gRPC target such as dns:name:port), or
 * several scheduler replicas' IP:PORT, comma-separated. Several become one `ipv4:`/`ipv6:`
 * target: the channel connects to the first replica that answers and moves to another when
 * its connection breaks, so a dead replica is skipped. (A DNS name that resolves to every
 * replica, such as a Kubernetes Service, does the same as one address.)
 */
export function grpcTarget(address: string): string {
  const parts = address
    .split(',')
    .map((a) => a.trim())
    .filter(Boolean);
  if (parts.length === 0) throw usageError('no scheduler address: pass --address HOST:PORT or set SDMESH_ADDRESS');
  if (parts.length === 1) {
    if (!ADDRESS_RE.test(parts[0]!)) throw usageError(`--address "${parts[0]}" is not HOST:PORT`);
    return parts[0]!;
  }
  if (parts.every((p) => IPV4_ADDRESS_RE.test(p))) return `ipv4:${parts.join(',')}`;
  if (parts.every((p) => IPV6_ADDRESS_RE.test(p))) return `ipv6:${parts.join(',')}`;
  throw usageError(
    `--address "${address}": several scheduler addresses must all be IPv4 or all IPv6 IP:PORT (or give one DNS name that resolves to every replica)`,
  );
}

export function connect(o: ConnectionOptions): Api {
  if (!o.address) throw usageError('no scheduler address: pass --address HOST:PORT or set SDMESH_ADDRESS');
  const target = grpcTarget(o.address);
  const creds = channelCredentials(o);
  // One channel shared by the service clients.
  const channel = new grpc.Client(target, creds, TLS_CHANNEL_OPTIONS);
  const opts: grpc.ClientOptions = { channelOverride: channel.getChannel() };
  const api = {
    domains: createClient(pb.StorageDomainServiceDefinition, target, creds, opts),
    disks: createClient(pb.DiskServiceDefinition, target, creds, opts),
    hosts: createClient(pb.HostServiceDefinition, target, creds, opts),
    ops: createClient(pb.OperationServiceDefinition, target, creds, opts),
    transfers: createClient(pb.ImageTransferServiceDefinition, target, creds, opts),
    attachments: createClient(pb.DiskAttachmentServiceDefinition, target, creds, opts),
    close: () => channel.close(),
  };
  return api;
}
