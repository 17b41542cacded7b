import pino, { type Logger } from 'pino';

export type { Logger };

/** JSON logs on stdout, one line per event, with the service and host on every line. */
export function createLogger(service: string, level = 'info', host = ''): Logger {
  return pino({
    level,
    base: { service, host: host || undefined, pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
  });
}
