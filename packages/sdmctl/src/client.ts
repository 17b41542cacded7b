import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { createClient, pb, type ServiceClient } from '@sdmesh/common';
import { usageError } from './exit';

export interface ConnectionOptions {
  /** host:port of the scheduler. */
  address: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
}

function readPem(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw usageError(`${what} ${file}: ${(err as Error).message}`);
  }
}

/**
 * Channel credentials: plaintext unless a TLS flag is given. With --tls-ca the server is
 * verified against that CA; --tls-cert with --tls-key add a client certificate (mutual TLS).
 * The sdmesh servers do not serve TLS yet: these are for a TLS-terminating proxy in front.
 */
export function channelCredentials(o: ConnectionOptions): grpc.ChannelCredentials {
  if (!o.tlsCa && !o.tlsCert && !o.tlsKey) return grpc.credentials.createInsecure();
  if (!!o.tlsCert !== !!o.tlsKey) throw usageError('--tls-cert and --tls-key go together (a client certificate and its key)');
  const ca = o.tlsCa ? readPem(o.tlsCa, '--tls-ca') : null;
  const key = o.tlsKey ? readPem(o.tlsKey, '--tls-key') : null;
  const cert = o.tlsCert ? readPem(o.tlsCert, '--tls-cert') : null;
  try {
    return grpc.credentials.createSsl(ca, key, cert);
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
  const channel = new grpc.Client(o.address, creds);
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
