/**
 * Configuration from command-line flags and environment variables, with `--help`.
 * Precedence: flag > environment > default. Flag `--grpc-port` ↔ env `SDMESH_GRPC_PORT`
 * for option key `grpcPort`. Bad input throws ConfigError with a one-line message.
 */

export type OptionType = 'string' | 'int' | 'port' | 'bool' | 'url' | 'urls' | 'enum';

export interface OptionSpec {
  type: OptionType;
  description: string;
  default?: string | number | boolean;
  required?: boolean;
  /** For 'enum'. */
  choices?: readonly string[];
  /** For 'int'. */
  min?: number;
  max?: number;
  /** Overrides the derived environment variable name. */
  env?: string;
}

export type ConfigSpec = Record<string, OptionSpec>;

type ValueOf<O extends OptionSpec> = O['type'] extends 'int' | 'port' ? number : O['type'] extends 'bool' ? boolean : string;

export type ConfigValues<S extends ConfigSpec> = { [K in keyof S]: ValueOf<S[K]> };

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** Thrown by parseConfig when --help was asked for; `text` is the help to print. */
export class HelpRequested extends Error {
  constructor(readonly text: string) {
    super('help requested');
  }
}

export const flagName = (key: string) => key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
export const envName = (key: string, spec: OptionSpec) => spec.env ?? 'SDMESH_' + flagName(key).replace(/-/g, '_').toUpperCase();

function convert(key: string, spec: OptionSpec, raw: string, source: string): string | number | boolean {
  const where = `${source} (${spec.type})`;
  switch (spec.type) {
    case 'string':
      return raw;
    case 'bool':
      if (/^(1|true|yes|on)$/i.test(raw)) return true;
      if (/^(0|false|no|off)$/i.test(raw)) return false;
      throw new ConfigError(`${where}: expected true or false, got "${raw}"`);
    case 'int':
    case 'port': {
      if (!/^-?\d+$/.test(raw.trim())) throw new ConfigError(`${where}: expected a whole number, got "${raw}"`);
      const n = Number(raw);
      const min = spec.type === 'port' ? 0 : (spec.min ?? Number.MIN_SAFE_INTEGER);
      const max = spec.type === 'port' ? 65535 : (spec.max ?? Number.MAX_SAFE_INTEGER);
      if (n < min || n > max) throw new ConfigError(`${where}: ${n} is out of range ${min}..${max}`);
      return n;
    }
    case 'url': {
      try {
        const u = new URL(raw);
        if (!u.protocol || !u.host) throw new Error('no host');
      } catch {
        throw new ConfigError(`${where}: "${raw}" is not a URL (e.g. nats://127.0.0.1:4222)`);
      }
      return raw;
    }
    case 'urls': {
      // Several servers of one cluster (e.g. NATS nodes): a client tries the next when one is gone.
      const urls = raw
        .split(',')
        .map((u) => u.trim())
        .filter(Boolean);
      if (!urls.length) throw new ConfigError(`${where}: expected one or more comma-separated URLs, got "${raw}"`);
      for (const u of urls) convert(key, { ...spec, type: 'url' }, u, source);
      return urls.join(',');
    }
    case 'enum':
      if (!spec.choices?.includes(raw)) {
        throw new ConfigError(`${where}: "${raw}" is not one of ${spec.choices?.join(', ')}`);
      }
      return raw;
  }
  throw new ConfigError(`option ${key}: unknown type`);
}

export function helpText<S extends ConfigSpec>(program: string, summary: string, spec: S): string {
  const lines = [`Usage: ${program} [options]`, '', summary, '', 'Options (flag / environment variable):'];
  for (const [key, s] of Object.entries(spec)) {
    const flag = s.type === 'bool' ? `--${flagName(key)}[=true|false]` : `--${flagName(key)} <${s.type === 'enum' ? s.choices?.join('|') : s.type}>`;
    const dflt = s.default !== undefined ? ` (default: ${s.default})` : s.required ? ' (required)' : '';
    lines.push(`  ${flag}`, `      ${envName(key, s)}  ${s.description}${dflt}`);
  }
  lines.push('  --help', '      Print this help and exit.');
  return lines.join('\n');
}

/**
 * Parses argv (without node and script) and env against spec.
 * Throws HelpRequested for --help/-h and ConfigError for anything wrong.
 */
export function parseConfig<S extends ConfigSpec>(spec: S, argv: readonly string[], env: NodeJS.ProcessEnv, program = 'sdmesh', summary = ''): ConfigValues<S> {
  const byFlag = new Map(Object.keys(spec).map((k) => [flagName(k), k]));
  const fromFlags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--help' || arg === '-h') throw new HelpRequested(helpText(program, summary, spec));
    if (!arg.startsWith('--')) throw new ConfigError(`unexpected argument "${arg}" (options start with --; see --help)`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const key = byFlag.get(name);
    if (!key) throw new ConfigError(`unknown option --${name} (see --help)`);
    let value: string | undefined = eq < 0 ? undefined : arg.slice(eq + 1);
    if (value === undefined) {
      if (spec[key]!.type === 'bool' && (i + 1 >= argv.length || argv[i + 1]!.startsWith('--'))) value = 'true';
      else if (i + 1 < argv.length) value = argv[++i];
      else throw new ConfigError(`option --${name} needs a value`);
    }
    fromFlags.set(key, value!);
  }
  const out: Record<string, string | number | boolean> = {};
  for (const [key, s] of Object.entries(spec)) {
    const flagValue = fromFlags.get(key);
    const envValue = env[envName(key, s)];
    if (flagValue !== undefined) out[key] = convert(key, s, flagValue, `--${flagName(key)}`);
    else if (envValue !== undefined && envValue !== '') out[key] = convert(key, s, envValue, envName(key, s));
    else if (s.default !== undefined) out[key] = s.default;
    else if (s.required) throw new ConfigError(`missing required option --${flagName(key)} (or ${envName(key, s)})`);
    else out[key] = s.type === 'bool' ? false : s.type === 'int' || s.type === 'port' ? 0 : '';
  }
  return out as ConfigValues<S>;
}

/** Options every service has. */
export const commonOptions = {
  hostName: { type: 'string', description: 'Name of this host (unique in the cluster).', env: 'SDMESH_HOST_NAME' },
  grpcHost: { type: 'string', description: 'Address the gRPC server binds to.', default: '127.0.0.1' },
  grpcPort: { type: 'port', description: 'gRPC port (0 = pick a free one).', default: 0 },
  metricsPort: { type: 'port', description: 'HTTP port for /metrics (0 = pick a free one).', default: 0 },
  natsUrl: { type: 'urls', description: 'NATS server URL, or the comma-separated URLs of several nodes of one NATS cluster.', required: true },
  logLevel: {
    type: 'enum',
    description: 'Log level.',
    choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'],
    default: 'info',
  },
  eventHeartbeatMs: { type: 'int', description: 'Interval of the service heartbeat event on NATS (0 = off).', default: 10000, min: 0 },
  shutdownGraceMs: { type: 'int', description: 'How long in-flight calls may run after SIGTERM.', default: 10000, min: 0 },
  tlsCa: { type: 'string', description: 'PEM CA bundle that signs every sdmesh certificate (mTLS on every gRPC hop).' },
  tlsCert: { type: 'string', description: 'PEM certificate of this workload (its sdmesh identity as URI SAN).' },
  tlsKey: { type: 'string', description: 'PEM private key of --tls-cert.' },
  tlsReloadMs: { type: 'int', description: 'How often the TLS files are checked for changes (rotation without restart).', default: 10000, min: 100 },
  grpcMaxConnectionAgeMs: {
    type: 'int',
    description: 'Server connections are recycled after this long, so every client re-handshakes with current certificates (rotation, revocation by expiry).',
    default: 3_600_000,
    min: 1000,
  },
  grpcMaxConnectionAgeGraceMs: { type: 'int', description: 'How long calls on a recycled connection may still run.', default: 600_000, min: 0 },
  grpcReflection: { type: 'bool', description: 'Serve gRPC server reflection (for grpcurl and the like).', default: true },
  insecure: {
    type: 'bool',
    description: 'DANGEROUS: serve and call gRPC in plaintext with no authentication or authorization. For debugging only.',
    default: false,
  },
  natsUser: { type: 'string', description: 'NATS user of this workload (required unless --insecure).' },
  natsPasswordFile: { type: 'string', description: 'File holding the password of --nats-user (re-read on every reconnect).' },
} as const satisfies ConfigSpec;
