#!/usr/bin/env node
import { runCli } from './app';

// Ctrl-C while waiting on an operation stops waiting (the operation goes on); a second one exits.
const interrupt = new AbortController();
process.on('SIGINT', () => {
  if (interrupt.signal.aborted) process.exit(130);
  interrupt.abort();
});
// A closed pipe (`sdmctl ... | head`) is not an error worth a stack trace.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
});

void runCli(process.argv.slice(2), process.env, {
  out: { write: (t) => void process.stdout.write(t) },
  err: { write: (t) => void process.stderr.write(t) },
  tty: process.stdout.isTTY === true,
  signal: interrupt.signal,
}).then((code) => {
  // Let stdout drain before exiting (pipes are asynchronous).
  process.stdout.write('', () => process.exit(code));
});
