// sdmctl as a library: the command runner, the on-disk domain check, event formatting.
export { runCli, COMMANDS, PROGRAM, overview, type RunIo } from './app';
export { checkDomain, readLeaseLeader, type CheckReport, type Finding, type ActiveTargets } from './check';
export { renderCheckReport } from './commands/check-events';
export { formatEvent, describePayload } from './events';
export { EXIT, CliError, toExit, exitCodeForGrpc } from './exit';
export { parseSize } from './args';
export { ProgressView } from './follow';
export { channelCredentials, connect, type Api, type ConnectionOptions } from './client';
