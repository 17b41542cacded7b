import type { CallOptions } from '@sdmesh/common';
import type { CommandSpec, FlagSpec } from './args';
import { connect, type Api, type ConnectionOptions } from './client';
import type { Out } from './output';

/** What every command gets: output streams, the global flags, and a lazily opened API. */
export interface Ctx {
  env: NodeJS.ProcessEnv;
  out: Out;
  err: Out;
  /** stdout is a terminal: live progress bars are drawn. */
  tty: boolean;
  output: 'table' | 'json';
  connection: ConnectionOptions;
  callTimeoutMs: number;
  /** Aborted on Ctrl-C: long waits stop and say how to resume. */
  signal: AbortSignal;
  api(): Api;
  /** Options for one unary API call (deadline, Ctrl-C). */
  call(extra?: CallOptions): CallOptions;
  close(): void;
}

export type Command = CommandSpec<Ctx>;

export const GLOBAL_FLAGS: FlagSpec[] = [
  {
    name: 'address',
    type: 'string',
    env: 'SDMESH_ADDRESS',
    value: 'HOST:PORT[,...]',
    description: "Scheduler gRPC address, or several replicas' IP:PORT comma-separated (a dead one is skipped)",
  },
  { name: 'output', short: 'o', type: 'enum', choices: ['table', 'json'], default: 'table', env: 'SDMCTL_OUTPUT', description: 'Output format' },
  {
    name: 'tls-ca',
    type: 'string',
    env: 'SDMESH_TLS_CA',
    value: 'FILE',
    description: 'CA bundle (PEM) of the mesh: the scheduler must present a certificate it signed, naming sdmesh://scheduler',
  },
  {
    name: 'tls-cert',
    type: 'string',
    env: 'SDMESH_TLS_CERT',
    value: 'FILE',
    description: 'Your client certificate (PEM, URI SAN sdmesh://user/<name>; the scheduler gives the name a role)',
  },
  { name: 'tls-key', type: 'string', env: 'SDMESH_TLS_KEY', value: 'FILE', description: 'Key of --tls-cert (PEM)' },
  { name: 'insecure', type: 'bool', env: 'SDMESH_INSECURE', description: 'Plaintext and no certificate: only for a mesh started with --insecure' },
  { name: 'call-timeout', type: 'int', min: 1, default: 30, env: 'SDMCTL_CALL_TIMEOUT', value: 'SECONDS', description: 'Deadline of each API call' },
];

export function makeContext(base: Omit<Ctx, 'api' | 'call' | 'close'>): Ctx {
  let api: Api | undefined;
  return {
    ...base,
    api: () => {
      if (!api && base.connection.insecure) {
        // The opt-out is loud: every run that talks plaintext says so, on stderr (stdout stays data).
        base.err.write(
          `sdmctl: WARNING: --insecure: plaintext to ${base.connection.address}, no certificate; anyone on the network can read and forge these calls\n`,
        );
      }
      return (api ??= connect(base.connection));
    },
    call: (extra = {}) => ({ timeoutMs: base.callTimeoutMs, signal: base.signal, ...extra }),
    close: () => api?.close(),
  };
}
