import { commandHelp, formatFlags, resolveFlags, splitArgv } from './args';
import { checkCommand, eventsCommand } from './commands/check-events';
import { diskLifecycleCommands } from './commands/disk-lifecycle';
import { diskCommands } from './commands/disks';
import { templateCommands } from './commands/templates';
import { transferCommands } from './commands/transfers';
import { domainCommands } from './commands/domains';
import { hostCommands, opCommands } from './commands/hosts-ops';
import { imageTransferCommands } from './commands/image-transfer';
import { GLOBAL_FLAGS, makeContext, type Command } from './context';
import { EXIT, toExit, usageError } from './exit';
import type { Out } from './output';

export const PROGRAM = 'sdmctl';

export const COMMANDS: Command[] = [
  ...domainCommands,
  ...diskCommands,
  ...diskLifecycleCommands,
  ...imageTransferCommands,
  ...templateCommands,
  ...hostCommands,
  ...opCommands,
  ...transferCommands,
  checkCommand,
  eventsCommand,
];

/** Group aliases: singular forms and "operations". */
const ALIASES: Record<string, string> = {
  domain: 'domains',
  disk: 'disks',
  host: 'hosts',
  op: 'ops',
  operations: 'ops',
  operation: 'ops',
  transfer: 'transfers',
};
const canonical = (words: string[]) => (words.length ? [ALIASES[words[0]!] ?? words[0]!, ...words.slice(1)] : words);
const find = (words: string[]) => COMMANDS.find((c) => c.path.join(' ') === canonical(words).join(' '));
const isPrefix = (words: string[]) => {
  const w = canonical(words);
  return COMMANDS.some((c) => w.length <= c.path.length && w.every((x, i) => c.path[i] === x));
};

export function overview(): string {
  const groups = new Map<string, Command[]>();
  for (const c of COMMANDS) groups.set(c.path[0]!, [...(groups.get(c.path[0]!) ?? []), c]);
  const lines = [
    `Usage: ${PROGRAM} <command> [arguments] [flags]`,
    '',
    'sdmctl drives sdmesh: storage domains, disks, hosts and operations through the scheduler API,',
    'events from NATS, and an on-disk check of a storage domain.',
    '',
    'Commands:',
  ];
  const w = Math.max(...COMMANDS.map((c) => c.path.join(' ').length)) + 2;
  for (const [, cmds] of groups) for (const c of cmds) lines.push(`  ${c.path.join(' ').padEnd(w)}${c.summary.split('. ')[0]!.replace(/\.$/, '')}`);
  lines.push(
    '',
    'Global flags:',
    ...formatFlags([...GLOBAL_FLAGS, { name: 'help', short: 'h', type: 'bool', description: 'Help of any command, with examples' }]),
    '',
    'Exit codes:',
    '  0  success',
    '  1  the request or operation failed (server refused it, operation FAILED/ABORTED, check found violations)',
    '  2  usage error (bad command line, or the server said an argument is invalid)',
    '  3  server or connection error (unreachable, deadline, TLS, internal/unimplemented on the server)',
    '  130  interrupted while waiting (the operation goes on)',
    '',
    'Mutating commands return at once with the operation; --wait follows it to the end.',
    `Examples:`,
    `  export SDMESH_ADDRESS=127.0.0.1:7000`,
    `  ${PROGRAM} domains create --name gold --path /mnt/shared/gold --wait`,
    `  ${PROGRAM} disks create --domain gold --size 1G --wait`,
    `  ${PROGRAM} disks move --domain gold DISK_ID --to silver --wait`,
    `  ${PROGRAM} check /mnt/shared/gold`,
    `  ${PROGRAM} disks --help`,
  );
  return lines.join('\n') + '\n';
}

function groupHelp(group: string): string {
  const cmds = COMMANDS.filter((c) => c.path[0] === group);
  const w = Math.max(...cmds.map((c) => c.path.join(' ').length)) + 2;
  return [
    `Usage: ${PROGRAM} ${group} <${cmds.map((c) => c.path[1]).join('|')}> [arguments] [flags]`,
    '',
    ...cmds.map((c) => `  ${c.path.join(' ').padEnd(w)}${c.summary}`),
    '',
    `Run '${PROGRAM} ${group} <command> --help' for its flags and examples.`,
    '',
  ].join('\n');
}

export interface RunIo {
  out: Out;
  err: Out;
  tty: boolean;
  signal: AbortSignal;
}

/** Runs one sdmctl invocation; returns the exit code. Never throws. */
export async function runCli(argv: readonly string[], env: NodeJS.ProcessEnv, io: RunIo): Promise<number> {
  let address = '';
  let close = () => undefined as void;
  try {
    const raw = splitArgv({ argv, env, globalFlags: GLOBAL_FLAGS, flagsFor: (w) => find(w)?.flags, isCommandPrefix: isPrefix });
    const cmd = find(raw.words);
    if (!cmd) {
      if (raw.words.length === 0 && raw.positionals.length === 0) {
        io.out.write(overview());
        return raw.help ? EXIT.OK : EXIT.USAGE;
      }
      const group = canonical(raw.words)[0]!;
      if (raw.words.length === 1 && COMMANDS.some((c) => c.path[0] === group)) {
        io.out.write(groupHelp(group));
        return raw.help ? EXIT.OK : EXIT.USAGE;
      }
      const unknown = raw.words.length ? raw.words.join(' ') : raw.positionals[0];
      throw usageError(`unknown command "${unknown}" (see ${PROGRAM} --help)`);
    }
    if (raw.help) {
      io.out.write(commandHelp(PROGRAM, cmd as never, GLOBAL_FLAGS) + '\n');
      return EXIT.OK;
    }
    // Unknown first positional after a group ("sdmctl disks frobnicate").
    const globals = resolveFlags({ ...raw, positionals: [] }, GLOBAL_FLAGS, env);
    const parsed = resolveFlags(raw, cmd.flags ?? [], env, cmd.args);
    address = (globals.flags.address as string | undefined) ?? '';
    const ctx = makeContext({
      env,
      out: io.out,
      err: io.err,
      tty: io.tty,
      output: globals.flags.output as 'table' | 'json',
      connection: {
        address,
        tlsCa: globals.flags['tls-ca'] as string | undefined,
        tlsCert: globals.flags['tls-cert'] as string | undefined,
        tlsKey: globals.flags['tls-key'] as string | undefined,
        insecure: globals.flags.insecure === true,
      },
      callTimeoutMs: (globals.flags['call-timeout'] as number) * 1000,
      signal: io.signal,
    });
    close = () => ctx.close();
    return await cmd.run(ctx, parsed);
  } catch (err) {
    const { message, code } = toExit(err, address ? `the scheduler at ${address}` : 'the server');
    io.err.write(`${PROGRAM}: ${message}\n`);
    if (env.SDMCTL_DEBUG === '1' && err instanceof Error && err.stack) io.err.write(err.stack + '\n');
    return code;
  } finally {
    close();
  }
}
