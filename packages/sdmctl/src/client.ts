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

/** The four public services of the scheduler (proto/sdmesh/v1/scheduler.proto). */
export interface Api {
  domains: ServiceClient<typeof pb.StorageDomainServiceDefinition>;
  disks: ServiceClient<typeof pb.DiskServiceDefinition>;
  hosts: ServiceClient<typeof pb.HostServiceDefinition>;
  ops: ServiceClient<typeof pb.OperationServiceDefinition>;
  close(): void;
}

const ADDRESS_RE = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$|^(unix|dns|ipv4|ipv6):/;

export function connect(o: ConnectionOptions): Api {
  if (!o.address) throw usageError('no scheduler address: pass --address HOST:PORT or set SDMESH_ADDRESS');
  if (!ADDRESS_RE.test(o.address)) throw usageError(`--address "${o.address}" is not HOST:PORT`);
  const creds = channelCredentials(o);
  // One channel shared by the four service clients.
  const channel = new grpc.Client(o.address, creds, TLS_CHANNEL_OPTIONS);
  const opts: grpc.ClientOptions = { channelOverride: channel.getChannel() };
  const api = {
    domains: createClient(pb.StorageDomainServiceDefinition, o.address, creds, opts),
    disks: createClient(pb.DiskServiceDefinition, o.address, creds, opts),
    hosts: createClient(pb.HostServiceDefinition, o.address, creds, opts),
    ops: createClient(pb.OperationServiceDefinition, o.address, creds, opts),
    close: () => channel.close(),
  };
  return api;
}
