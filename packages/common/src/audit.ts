import fs from 'node:fs';

/**
 * The chaos harness's audit trail (tests/chaos, docs/chaos.md): one JSON line per exclusive or
 * shared lease grant and release (lease-manager) and per data or record write of a volume (the
 * copy worker, the writer itself), appended to the file named by SDMESH_AUDIT_LOG. Off (no file,
 * no cost beyond one check) unless that variable is set; production never sets it.
 *
 * Times are CLOCK_MONOTONIC microseconds (process.hrtime), which every process of one machine
 * shares, so the checker can order lines of different processes and the harness's own faults.
 * Each line is one write(2) on an O_APPEND descriptor: lines of concurrent processes never interleave.
 */
export type AuditRecord =
  | {
      kind: 'lease-grant' | 'lease-release';
      host: string;
      pid: number;
      lockspace: string;
      resource: string;
      mode: 'exclusive' | 'shared';
      lver?: number;
      /** Where the lease lies in its file: a volume id may have two leases at once (a moved-back disk beside its garbage). */
      offset?: number;
    }
  | {
      kind: 'write';
      /**
       * record: one atomic metadata write (a point); data-start/data-end: qemu-img writing the
       * volume's data; remove: the GC removing garbage under the domain metadata lease (volume
       * 'SDM', at the start and the end of each batch).
       */
      phase: 'record' | 'data-start' | 'data-end' | 'remove';
      host: string;
      pid: number;
      domain: string;
      volume: string;
      /** The generation the writer works under (the one it checked under its lease; -1: none). */
      generation: number;
      /** The volume's lease offset, and its creation time: which incarnation of a volume id this is. */
      leaseOffset?: number;
      incarnation?: number;
      /** For a record write: the generation and legality the record now says. */
      recordGeneration?: number;
      legality?: string;
    };

export type AuditLine = AuditRecord & { t: number };

let fd: number | undefined | null = null;

function auditFd(): number | undefined {
  if (fd !== null) return fd;
  const file = process.env.SDMESH_AUDIT_LOG;
  fd = file ? fs.openSync(file, 'a', 0o644) : undefined;
  return fd;
}

/** Is the audit trail on in this process? */
export const auditEnabled = (): boolean => auditFd() !== undefined;

/** Appends one audit line (no-op when SDMESH_AUDIT_LOG is unset). */
export function audit(record: AuditRecord): void {
  const out = auditFd();
  if (out === undefined) return;
  const line: AuditLine = { t: monotonicMicros(), ...record };
  fs.writeSync(out, JSON.stringify(line) + '\n');
}

/** CLOCK_MONOTONIC in microseconds: comparable between processes of one machine. */
export const monotonicMicros = (): number => Number(process.hrtime.bigint() / 1000n);

/**
 * Deliberately broken builds for the chaos checker's negative controls: a switch named in
 * SDMESH_BROKEN (comma-separated) is on only when SDMESH_CHAOS_TEST=1 is set as well, so a
 * stray variable alone never weakens a real deployment. Known switches:
 *  - `skip-destination-lease`: the copy worker writes a destination without its exclusive lease.
 *  - `gc-without-domain-lease`: the GC removes transaction leftovers and records without the domain metadata lease.
 */
export function brokenForTest(name: 'skip-destination-lease' | 'gc-without-domain-lease'): boolean {
  if (process.env.SDMESH_CHAOS_TEST !== '1') return false;
  return (process.env.SDMESH_BROKEN ?? '').split(',').includes(name);
}
