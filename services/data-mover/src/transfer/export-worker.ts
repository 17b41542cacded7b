/**
 * The export of one image transfer, in its own process (the copy worker's pattern): it registers
 * with the host's sanlock daemon and takes the chain's volume leases through the lease-manager
 * for ITS pid — the leaf exclusive for an upload, shared for a download, the parents shared, in
 * the global lease order — checks the leaf's generation under them, and runs qemu-nbd over the
 * opened chain on a unix socket in the service's private run dir. qemu-nbd is started with
 * `setpriv --pdeathsig KILL` and inherits the sanlock registration, so the leases live until both
 * it and this worker are gone and no write of it outlives them; the written layer is opened
 * O_DIRECT (cache=none: docs/data-mover.md, "No write outlives its lease").
 *
 *   open → leases → re-read, generation check → qemu-nbd serving → ready
 *   close → SIGTERM qemu-nbd (it flushes and stores dirty bitmaps) → fsync → leases released → closed, exit
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  createLogger,
  DomainLeases,
  fail,
  failedPrecondition,
  FIRST_CHILD_FD,
  holdLeasesInOrder,
  LeaseHolder,
  NbdClient,
  Reason,
  setStorageGroup,
  type LeaseClaim,
  type Logger,
} from '@sdmesh/common';
import { SETPRIV } from '../qemu';
import { openVolumeChain, resolveVolume, type ResolvedVolume } from '../volumes';
import { sendToParent, toWire } from '../worker-protocol';
import type { ExportConfig, ExportToService, ServiceToExport } from './export-protocol';
import type { TransferTicket } from './tickets';

export const QEMU_NBD = process.env.SDMESH_QEMU_NBD ?? 'qemu-nbd';
/** How long qemu-nbd gets to flush and store its bitmaps after SIGTERM before SIGKILL. */
const STOP_GRACE_MS = 30_000;

let log: Logger = createLogger('data-mover-export');
const closeRequested = new AbortController();

const send = (msg: ExportToService) => sendToParent(msg);

/** The chain the ticket names must be the leaf's chain as its records say now (base first). */
function checkChain(ticket: TransferTicket, leaf: ResolvedVolume): void {
  const chain = [...leaf.ancestors].reverse().map((r) => r.volumeId);
  chain.push(leaf.volumeId);
  if (chain.join('/') !== ticket.volumeIds.join('/')) {
    throw fail(Reason.VOLUME_CHANGED, `the chain of volume ${leaf.volumeId} is ${chain.join(' ← ')} now, not ${ticket.volumeIds.join(' ← ')}`);
  }
  if (leaf.record.generation !== ticket.generation) {
    throw failedPrecondition(
      `volume ${leaf.volumeId} is at generation ${leaf.record.generation}, the transfer expected ${ticket.generation}: it changed meanwhile`,
      Reason.GENERATION_MISMATCH,
    );
  }
  if (ticket.direction === 'download') {
    const illegal = [leaf.record, ...leaf.ancestors].find((r) => r.legality !== 'LEGAL');
    if (illegal) throw failedPrecondition(`volume ${illegal.volumeId} is ILLEGAL: its data can't be downloaded`, Reason.VOLUME_ILLEGAL);
  }
  if (leaf.record.capacityBytes < ticket.size) {
    throw failedPrecondition(`volume ${leaf.volumeId} holds ${leaf.record.capacityBytes} bytes, less than the transfer's ${ticket.size}`);
  }
}

/** qemu-nbd arguments: a unix socket, several clients, the chain's spec, the written layer O_DIRECT. */
export function qemuNbdArgs(opts: { socket: string; spec: string; format: string; readOnly: boolean; bitmap?: string }): string[] {
  const args = ['--socket', opts.socket, '--persistent', '--shared', '16', '--format', opts.format.toLowerCase(), '--cache', 'none', '--aio', 'threads'];
  if (opts.readOnly) args.push('--read-only');
  // Zeroing may punch holes (a sparse upload stays sparse).
  else args.push('--discard', 'unmap');
  if (opts.bitmap) args.push('--bitmap', opts.bitmap);
  args.push(opts.spec);
  return args;
}

function waitForSocket(file: string, child: ChildProcess, stderr: () => string): Promise<void> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      if (child.exitCode !== null || child.signalCode !== null) {
        return reject(fail(Reason.QEMU_IMG_FAILED, `qemu-nbd exited at start: ${stderr().trim() || `exit ${child.exitCode ?? child.signalCode}`}`));
      }
      // The socket file exists before qemu-nbd listens: ready once a client gets through the handshake.
      if (fs.existsSync(file)) {
        void NbdClient.connect(file).then(
          (c) => void c.close().then(resolve, resolve),
          () => setTimeout(poll, 20),
        );
        return;
      }
      if (Date.now() - started > 60_000) return reject(fail(Reason.QEMU_IMG_FAILED, 'qemu-nbd did not listen within 60 s'));
      setTimeout(poll, 20);
    };
    poll();
  });
}

async function runExport(ticket: TransferTicket, config: ExportConfig): Promise<void> {
  setStorageGroup(config.storageGroupId);
  const holder = await LeaseHolder.register({ leaseManagerAddress: config.leaseManagerAddress, log });
  registration = [holder.registrationFd];
  try {
    const ref = { domainPath: ticket.domainPath, imageId: ticket.imageId, volumeId: ticket.volumeIds[ticket.volumeIds.length - 1]! };
    const pre = await resolveVolume('volume', ref);
    checkChain(ticket, pre);
    const leases = new DomainLeases(holder);
    const domain = pre.domain;
    const upload = ticket.direction === 'upload';
    const claims: LeaseClaim[] = [pre.record, ...pre.ancestors].map((r, i) => {
      const mode = i === 0 && upload ? 'exclusive' : 'shared';
      return {
        lockspace: domain.id,
        resource: r.volumeId,
        mode,
        hold: (body) =>
          leases.withVolumeLease(domain, r.volumeId, r.leaseSlot, mode, ticket.transferId, body, {
            // A busy leaf fails at once (LEASE_HELD); readers queue behind other readers of this host.
            wait: mode === 'shared',
            signal: mode === 'shared' ? AbortSignal.any([closeRequested.signal, AbortSignal.timeout(config.sharedLeaseWaitMs)]) : closeRequested.signal,
          }),
      };
    });
    await holdLeasesInOrder(claims, async () => {
      const leaf = await resolveVolume('volume', ref);
      checkChain(ticket, leaf);
      const chain = await openVolumeChain(leaf, { write: upload, readDirect: true });
      try {
        await serve(
          ticket,
          config,
          leaf,
          chain.spec(FIRST_CHILD_FD),
          chain.handles.map((h) => h.fd),
        );
        if (upload) await chain.handles[0]!.sync();
      } finally {
        await chain.close();
      }
    });
  } finally {
    await holder.close().catch(() => undefined);
  }
}

/** Runs qemu-nbd until the service asks to close (or qemu-nbd dies: a failure). */
async function serve(ticket: TransferTicket, config: ExportConfig, leaf: ResolvedVolume, spec: string, fds: number[]): Promise<void> {
  const socket = path.join(config.runDir, 'nbd.sock');
  fs.rmSync(socket, { force: true });
  const args = qemuNbdArgs({ socket, spec, format: leaf.record.format, readOnly: ticket.direction === 'download', bitmap: ticket.bitmap });
  const child = spawn(SETPRIV, ['--pdeathsig', 'KILL', QEMU_NBD, ...args], {
    cwd: '/',
    detached: true,
    stdio: ['ignore', 'ignore', 'pipe', ...fds, ...registrationFd()],
  });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr = (stderr + c).slice(-4000)));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  child.once('error', (err) => (stderr += `cannot start qemu-nbd: ${err.message}`));
  try {
    await waitForSocket(socket, child, () => stderr);
    log.info({ pid: child.pid, socket, transfer: ticket.transferId, direction: ticket.direction }, 'export serving');
    await send({ type: 'ready', socket, size: ticket.size });
    const closed = new Promise<void>((resolve) => closeRequested.signal.addEventListener('abort', () => resolve(), { once: true }));
    await Promise.race([closed, exited]);
    if (!closeRequested.signal.aborted)
      throw fail(Reason.WORKER_DIED, `qemu-nbd exited while serving: ${stderr.trim() || `exit ${child.exitCode ?? child.signalCode}`}`);
    // SIGTERM: qemu-nbd closes its image cleanly (flushes, stores persistent dirty bitmaps).
    child.kill('SIGTERM');
    const grace = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
    await exited;
    clearTimeout(grace);
    if (child.signalCode === 'SIGKILL') throw fail(Reason.WORKER_DIED, `qemu-nbd did not stop within ${STOP_GRACE_MS} ms and was killed`);
  } finally {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
    fs.rmSync(socket, { force: true });
  }
}

/** The registered sanlock connection, inherited by qemu-nbd: the leases outlive neither. */
let registration: number[] = [];
const registrationFd = () => registration;

function main(): void {
  if (!process.send) {
    process.stderr.write('export-worker: must be started by the data-mover service (IPC channel missing)\n');
    process.exit(2);
  }
  let started = false;
  process.on('message', (msg: ServiceToExport) => {
    if (msg.type === 'close') {
      closeRequested.abort(fail(Reason.ABORTED, 'transfer closed'));
      return;
    }
    if (msg.type !== 'open' || started) return;
    started = true;
    log = createLogger('data-mover-export', msg.config.logLevel, msg.config.hostName).child({ transfer: msg.ticket.transferId });
    runExport(msg.ticket, msg.config)
      .then(() => send({ type: 'closed' }))
      .catch((err: unknown) => {
        log.warn({ err: String(err) }, 'export failed');
        return send({ type: 'failed', error: toWire(err) });
      })
      .finally(() => process.exit(0));
  });
  process.on('disconnect', () => {
    closeRequested.abort(fail(Reason.ABORTED, 'the data-mover service exited'));
    setTimeout(() => process.exit(1), 2000).unref();
  });
}

if (require.main === module) main();
