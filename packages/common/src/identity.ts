/**
 * Who is calling. Every workload's certificate names it in a URI subject alternative name:
 *
 *   sdmesh://scheduler                  a scheduler replica
 *   sdmesh://host/<host>/<service>      a per-host service (lease-manager, metadata-tx, data-mover, gc)
 *   sdmesh://user/<name>                a person or program; its role comes from the scheduler's roles file
 *
 * Callers on the lease-manager's unix socket are `local`: a process of this host, known by
 * the pid the kernel reports for the socket (SO_PEERCRED), never by what it says.
 * `insecure` is the identity of every TCP caller when a service runs with --insecure.
 */
export type Identity =
  | { kind: 'scheduler' }
  | { kind: 'host'; host: string; service: HostServiceName }
  | { kind: 'user'; name: string }
  | { kind: 'local'; pid: number; uid: number }
  | { kind: 'insecure' };

export const HOST_SERVICE_NAMES = ['lease-manager', 'metadata-tx', 'data-mover', 'gc'] as const;
export type HostServiceName = (typeof HOST_SERVICE_NAMES)[number];

export const IDENTITY_SCHEME = 'sdmesh:';

// Host and user names: DNS-label-like, so they are safe in URIs, file names and log lines.
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export const isValidIdentityName = (s: string) => NAME.test(s);

/** The URI SAN a certificate for this identity carries. */
export function identityUri(id: Exclude<Identity, { kind: 'local' } | { kind: 'insecure' }>): string {
  switch (id.kind) {
    case 'scheduler':
      return 'sdmesh://scheduler';
    case 'host':
      return `sdmesh://host/${id.host}/${id.service}`;
    case 'user':
      return `sdmesh://user/${id.name}`;
  }
}

/** Parses one sdmesh URI; undefined for anything else (foreign URIs are not identities). */
export function parseIdentityUri(uri: string): Identity | undefined {
  if (!uri.startsWith('sdmesh://')) return undefined;
  const parts = uri.slice('sdmesh://'.length).split('/');
  if (parts.length === 1 && parts[0] === 'scheduler') return { kind: 'scheduler' };
  if (parts.length === 3 && parts[0] === 'host' && NAME.test(parts[1]!) && (HOST_SERVICE_NAMES as readonly string[]).includes(parts[2]!)) {
    return { kind: 'host', host: parts[1]!, service: parts[2] as HostServiceName };
  }
  if (parts.length === 2 && parts[0] === 'user' && NAME.test(parts[1]!)) return { kind: 'user', name: parts[1]! };
  return undefined;
}

/**
 * The identity in a certificate's subjectaltname string (as Node's PeerCertificate gives it,
 * e.g. `URI:sdmesh://scheduler, DNS:localhost`). Exactly one sdmesh URI is accepted: a
 * certificate naming two identities is refused rather than guessed at.
 */
export function identityFromSubjectAltName(san: string | undefined): Identity | undefined {
  if (!san) return undefined;
  const uris = san
    .split(/,\s*/)
    .filter((e) => e.startsWith('URI:'))
    .map((e) => e.slice(4))
    .filter((u) => u.startsWith('sdmesh://'));
  if (uris.length !== 1) return undefined;
  return parseIdentityUri(uris[0]!);
}

/** A short form for logs, metrics and error messages. */
export function describeIdentity(id: Identity | undefined): string {
  if (!id) return 'anonymous';
  switch (id.kind) {
    case 'local':
      return `local pid ${id.pid}`;
    case 'insecure':
      return 'insecure (no TLS)';
    default:
      return identityUri(id);
  }
}
