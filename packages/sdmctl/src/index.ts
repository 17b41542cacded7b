// sdmctl as a library: the command runner, the on-disk domain check, event formatting.
export { runCli, COMMANDS, PROGRAM, overview, type RunIo } from './app';
export { checkDomain, readLeaseLeader, type CheckReport, type Finding, type ActiveTargets } from './check';
export { renderCheckReport } from './commands/check-events';
export { formatEvent, describePayload } from './events';
export { EXIT, CliError, toExit, exitCodeForGrpc } from './exit';
export { parseSize } from './args';
export { ProgressView } from './follow';
export { channelCredentials, connect, type Api, type ConnectionOptions } from './client';
// Image transfer clients (issue 19): the data endpoint, and sparse upload/download/backup through it.
export { EndpointError, TransferEndpoint, type EndpointTls } from './transfer/endpoint';
export { backup, download, upload, type TransferOptions, type TransferResult } from './transfer/transfers';
