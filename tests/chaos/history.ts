import fs from 'node:fs';
import { monotonicMicros } from '@sdmesh/common';

/** What the history records: client calls and their outcomes, faults, guest data writes, process exits and restarts. */
export type HistoryEvent =
  | { kind: 'call'; client: number; op: string; requestId: string; args: Record<string, unknown> }
  | {
      kind: 'outcome';
      client: number;
      op: string;
      requestId: string;
      outcome: string;
      operationName?: string;
      error?: string;
      result?: Record<string, unknown>;
    }
  | { kind: 'fault'; fault: string; target: string; pid?: number; detail?: string; index: number }
  | {
      kind: 'guest-write';
      client: number;
      disk: string;
      domain: string;
      volume: string;
      /** The volume's lease offset (GetDisk's), which tells it from a garbage volume of the same id. */
      leaseOffset?: number;
      pattern: number;
      offset: number;
      length: number;
      pid: number;
      start: number;
      end: number;
      ok: boolean;
    }
  | { kind: 'content-check'; client: number; disk: string; ok: boolean; detail?: string }
  | { kind: 'process-exit'; target: string; pid: number; code: number | string }
  | { kind: 'restart'; target: string; pid: number; detail?: string }
  | { kind: 'phase'; phase: string };

export type HistoryLine = HistoryEvent & { t: number };

/** The run's history: in memory for the checker, and one JSON line per event in `<dir>/history.jsonl`. */
export class History {
  readonly events: HistoryLine[] = [];
  private fd: number | undefined;

  constructor(readonly file: string) {
    this.fd = fs.openSync(file, 'a');
  }

  add(event: HistoryEvent, t = monotonicMicros()): HistoryLine {
    const line = { t, ...event } as HistoryLine;
    this.events.push(line);
    // After close (a restart that ends after the run): kept in memory only.
    if (this.fd !== undefined) fs.writeSync(this.fd, JSON.stringify(line) + '\n');
    return line;
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }
}
