import { usageError } from './exit';

/**
 * A small command-line parser made for sdmctl: `sdmctl <group> <verb> [ARGS] [--flags]`,
 * flags anywhere (before or after the command), `--flag value` or `--flag=value`, booleans as
 * `--wait`, `--wait=false` or `--no-wait`, `--` ends the flags. Every flag can have an
 * environment-variable default. Errors are usage errors (exit code 2).
 */

export type FlagType = 'string' | 'bool' | 'int' | 'enum';

export interface FlagSpec {
  /** Long name without dashes, e.g. "output". */
  name: string;
  type: FlagType;
  description: string;
  short?: string;
  env?: string;
  default?: string | number | boolean;
  choices?: readonly string[];
  /** Shown in help as the value's name, e.g. "ADDRESS". */
  value?: string;
  min?: number;
}

export interface ArgSpec {
  name: string;
  description: string;
  optional?: boolean;
}

export type FlagValues = Record<string, string | number | boolean | undefined>;

export interface Parsed {
  flags: FlagValues;
  args: string[];
  /** Flags the user typed (not defaults or env), by name. */
  given: Set<string>;
}

export interface CommandSpec<Ctx = unknown> {
  /** e.g. ['disks', 'create']. */
  path: string[];
  summary: string;
  /** Longer explanation shown by --help. */
  details?: string;
  args?: ArgSpec[];
  flags?: FlagSpec[];
  examples: string[];
  run(ctx: Ctx, parsed: Parsed): Promise<number>;
}

export function flagUsage(f: FlagSpec): string {
  const names = `${f.short ? `-${f.short}, ` : ''}--${f.name}`;
  if (f.type === 'bool') return names;
  const v = f.type === 'enum' ? (f.choices ?? []).join('|') : (f.value ?? f.name.toUpperCase());
  return `${names} ${v}`;
}

export function formatFlags(flags: readonly FlagSpec[]): string[] {
  const lines: string[] = [];
  const width = Math.min(34, Math.max(...flags.map((f) => flagUsage(f).length)) + 2);
  for (const f of flags) {
    const extra: string[] = [];
    if (f.env) extra.push(`env ${f.env}`);
    if (f.default !== undefined && f.default !== '' && f.default !== false) extra.push(`default ${f.default}`);
    const usage = flagUsage(f);
    const text = `${f.description}${extra.length ? ` (${extra.join(', ')})` : ''}`;
    if (usage.length + 2 > width) lines.push(`  ${usage}`, `  ${''.padEnd(width)}${text}`);
    else lines.push(`  ${usage.padEnd(width)}${text}`);
  }
  return lines;
}

export function commandHelp(program: string, cmd: CommandSpec<never>, globalFlags: readonly FlagSpec[]): string {
  const args = (cmd.args ?? []).map((a) => (a.optional ? `[${a.name}]` : a.name)).join(' ');
  const lines = [`Usage: ${program} ${cmd.path.join(' ')}${args ? ` ${args}` : ''} [flags]`, '', cmd.summary];
  if (cmd.details) lines.push('', cmd.details);
  if (cmd.args?.length) {
    lines.push('', 'Arguments:');
    const w = Math.max(...cmd.args.map((a) => a.name.length)) + 2;
    for (const a of cmd.args) lines.push(`  ${a.name.padEnd(w)}${a.description}`);
  }
  if (cmd.flags?.length) lines.push('', 'Flags:', ...formatFlags(cmd.flags));
  lines.push('', 'Global flags:', ...formatFlags(globalFlags));
  lines.push('', 'Examples:', ...cmd.examples.map((e) => `  ${e}`));
  return lines.join('\n');
}

function convert(f: FlagSpec, raw: string, where: string): string | number | boolean {
  switch (f.type) {
    case 'bool':
      if (/^(1|true|yes|on)$/i.test(raw)) return true;
      if (/^(0|false|no|off)$/i.test(raw)) return false;
      throw usageError(`${where}: expected true or false, got "${raw}"`);
    case 'int': {
      if (!/^\d+$/.test(raw.trim())) throw usageError(`${where}: expected a whole number, got "${raw}"`);
      const n = Number(raw);
      if (f.min !== undefined && n < f.min) throw usageError(`${where}: must be at least ${f.min}`);
      return n;
    }
    case 'enum':
      if (!f.choices?.includes(raw)) throw usageError(`${where}: "${raw}" is not one of ${f.choices?.join(', ')}`);
      return raw;
    default:
      return raw;
  }
}

export interface ParseInput {
  argv: readonly string[];
  env: NodeJS.ProcessEnv;
  globalFlags: readonly FlagSpec[];
  /** Flags of the command, once it is known (looked up after the command words). */
  flagsFor: (words: string[]) => readonly FlagSpec[] | undefined;
  /** True while `words` can still grow into a command path. */
  isCommandPrefix: (words: string[]) => boolean;
}

export interface RawParse {
  words: string[];
  positionals: string[];
  help: boolean;
  raw: Map<string, string>;
}

/** First pass: split argv into command words, positionals and flag values. */
export function splitArgv(input: ParseInput): RawParse {
  const out: RawParse = { words: [], positionals: [], help: false, raw: new Map() };
  let flagsDone = false;
  const known = (): FlagSpec[] => [...input.globalFlags, ...(input.flagsFor(out.words) ?? [])];
  for (let i = 0; i < input.argv.length; i++) {
    const arg = input.argv[i]!;
    if (!flagsDone && arg === '--') {
      flagsDone = true;
      continue;
    }
    if (!flagsDone && (arg === '--help' || arg === '-h')) {
      out.help = true;
      continue;
    }
    if (!flagsDone && arg.startsWith('-') && arg !== '-') {
      const long = arg.startsWith('--');
      const eq = arg.indexOf('=');
      let name = long ? arg.slice(2, eq < 0 ? undefined : eq) : arg.slice(1, eq < 0 ? undefined : eq);
      let value: string | undefined = eq < 0 ? undefined : arg.slice(eq + 1);
      const flags = known();
      let spec = long ? flags.find((f) => f.name === name) : flags.find((f) => f.short === name);
      if (!spec && long && name.startsWith('no-') && value === undefined) {
        const positive = flags.find((f) => f.name === name.slice(3) && f.type === 'bool');
        if (positive) {
          spec = positive;
          name = positive.name;
          value = 'false';
        }
      }
      if (!spec) {
        const what = out.words.length ? `for "${out.words.join(' ')}"` : '';
        throw usageError(`unknown flag ${arg.split('=')[0]} ${what}(see --help)`.replace(/\s+\(/, ' ('));
      }
      if (value === undefined) {
        if (spec.type === 'bool') value = 'true';
        else if (i + 1 < input.argv.length) value = input.argv[++i]!;
        else throw usageError(`flag --${spec.name} needs a value`);
      }
      out.raw.set(spec.name, value);
      continue;
    }
    if (out.positionals.length === 0 && input.isCommandPrefix([...out.words, arg])) out.words.push(arg);
    else out.positionals.push(arg);
  }
  return out;
}

/** Second pass: flag values with env and defaults applied; positionals checked against args. */
export function resolveFlags(raw: RawParse, flags: readonly FlagSpec[], env: NodeJS.ProcessEnv, args: readonly ArgSpec[] = []): Parsed {
  const values: FlagValues = {};
  const given = new Set<string>();
  for (const f of flags) {
    const r = raw.raw.get(f.name);
    if (r !== undefined) {
      values[f.name] = convert(f, r, `--${f.name}`);
      given.add(f.name);
    } else if (f.env && env[f.env] !== undefined && env[f.env] !== '') values[f.name] = convert(f, env[f.env]!, f.env);
    else values[f.name] = f.default;
  }
  const required = args.filter((a) => !a.optional).length;
  if (raw.positionals.length < required) {
    const missing = args
      .slice(raw.positionals.length)
      .filter((a) => !a.optional)
      .map((a) => a.name);
    throw usageError(`missing ${missing.join(' ')} (see ${['sdmctl', ...raw.words].join(' ')} --help)`);
  }
  if (raw.positionals.length > args.length) {
    throw usageError(`unexpected argument "${raw.positionals[args.length]}" (see ${['sdmctl', ...raw.words].join(' ')} --help)`);
  }
  return { flags: values, args: raw.positionals, given };
}

/** "1G", "512MiB", "10737418240", "1.5T" → bytes (binary units, as qemu-img). */
export function parseSize(text: string, what = '--size'): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw usageError(`${what}: "${text}" is not a size (e.g. 1G, 512M, 1073741824)`);
  const unit = ' kmgtp'.indexOf((m[2] || ' ').toLowerCase());
  const bytes = Number(m[1]) * 1024 ** unit;
  if (bytes > Number.MAX_SAFE_INTEGER)
    throw usageError(`${what}: "${text}" is too large (sizes go up to ${Number.MAX_SAFE_INTEGER} bytes here, and the server allows less)`);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) throw usageError(`${what}: "${text}" is not a positive whole number of bytes`);
  return bytes;
}
