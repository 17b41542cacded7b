import { fail, failedPrecondition, invalidArgument, pb, Reason, type ServiceHandlers, type StorageRoots } from '@sdmesh/common';
import { Counter, type Registry } from 'prom-client';
import { openVolumeChain, resolveVolume } from './volumes';
import { qemuImgTopInfo, runQemuImg } from './qemu';
import { TICKET_ID, type TransferRegistry, type TransferStats } from './transfer/tickets';

/**
 * The data-mover's side of the image transfer control plane (docs/image-transfer.md): OpenTransfer,
 * GetTransfer and CloseTransfer, called by the scheduler only (authz), over the transfer registry
 * of the data endpoint (transfer/registry.ts). A host started without the endpoint refuses them
 * (TRANSFERS_DISABLED). A closed transfer's last state is kept a while, so a close the scheduler
 * retries after a lost answer gets the same answer.
 */
type TransferMethods = Pick<ServiceHandlers<typeof pb.DataMoverServiceDefinition>, 'openTransfer' | 'getTransfer' | 'closeTransfer'>;

/** How many closed transfers' last states are kept (oldest dropped first). */
const CLOSED_KEPT = 256;

export function transferHandlers(transfers: TransferRegistry | undefined, roots: StorageRoots, registry: Registry): TransferMethods {
  const closedTotal = new Counter({
    name: 'sdmesh_data_mover_transfers_closed_total',
    help: 'Image transfers closed on this host, by direction (upload, download) and how (finalized: flushed and verified; rolled_back: closed without).',
    labelNames: ['direction', 'outcome'],
    registers: [registry],
  });
  for (const direction of ['upload', 'download']) for (const outcome of ['finalized', 'rolled_back']) closedTotal.inc({ direction, outcome }, 0);
  const directions = new Map<string, string>();
  const closed = new Map<string, pb.TransferState>();
  const enabled = (): TransferRegistry => {
    if (!transfers) throw failedPrecondition('this data-mover serves no image transfers (started without --transfer-port)', Reason.TRANSFERS_DISABLED);
    return transfers;
  };
  const ticketOf = (id: string) => {
    if (!TICKET_ID.test(id)) throw invalidArgument('ticket is not a transfer ticket (43 base64url characters)', Reason.INVALID_ID);
    return id;
  };
  const unknown = () => fail(Reason.TRANSFER_NOT_FOUND, 'this data-mover has no such transfer (never opened here, or forgotten by a restart)');
  const stateOf = (url: string, s: TransferStats, verified: string[] = []): pb.TransferState => ({
    url,
    active: s.active,
    bytesRead: s.bytesRead,
    bytesWritten: s.bytesWritten,
    idleMs: Math.max(0, Date.now() - s.lastActivityAt),
    failed: s.failed ?? '',
    verified,
  });

  return {
    async openTransfer(req) {
      const registry = enabled();
      const ticketId = ticketOf(req.ticket);
      roots.requireUnder(req.domainPath, 'transfer domain path');
      if (req.direction !== 'upload' && req.direction !== 'download') throw invalidArgument(`direction ${req.direction}`, Reason.INVALID_TRANSFER_DIRECTION);
      const { url } = await registry.open({
        ticketId,
        transferId: req.transferId,
        owner: req.owner,
        diskId: req.imageId,
        domainId: req.domainId,
        domainPath: req.domainPath,
        imageId: req.imageId,
        volumeIds: req.volumeIds,
        generation: req.generation,
        direction: req.direction,
        format: 'raw',
        size: req.sizeBytes,
        bitmap: req.bitmap || undefined,
        expiresAt: Math.min(Date.now() + req.idleTimeoutMs, req.maxExpiresAtMs),
        idleTimeoutMs: req.idleTimeoutMs,
        maxExpiresAt: req.maxExpiresAtMs,
      });
      directions.set(ticketId, req.direction);
      const s = registry.stats(ticketId);
      if (!s) throw unknown();
      return stateOf(url, s);
    },

    async getTransfer(req) {
      const ticketId = ticketOf(req.ticket);
      const done = closed.get(ticketId);
      if (done) return { ...done, active: false };
      const s = enabled().stats(ticketId);
      if (!s) throw unknown();
      return stateOf('', s);
    },

    async closeTransfer(req, ctx) {
      const ticketId = ticketOf(req.ticket);
      let state = closed.get(ticketId);
      if (!state) {
        const registry = enabled();
        if (!registry.stats(ticketId)) throw unknown();
        const s = await registry.close(ticketId, { flush: req.flush });
        if (s.failed) throw fail(Reason.TRANSFER_FAILED, `the export failed: ${s.failed}`);
        state = stateOf('', { ...s, active: false });
        remember(closed, ticketId, state);
        const direction = directions.get(ticketId) ?? 'unknown';
        directions.delete(ticketId);
        closedTotal.inc({ direction, outcome: req.flush ? 'finalized' : 'rolled_back' });
      }
      if (!req.verify) return state;
      roots.requireUnder(req.verify.domainPath, 'verified volume domain path');
      return { ...state, verified: await verifyVolume(req.verify, req.expectedSizeBytes, ctx.signal) };
    },
  };
}

function remember(closed: Map<string, pb.TransferState>, ticketId: string, state: pb.TransferState): void {
  closed.set(ticketId, state);
  for (const key of closed.keys()) {
    if (closed.size <= CLOSED_KEPT) break;
    closed.delete(key);
  }
}

/**
 * An uploaded volume after its export closed: its virtual size is the record's capacity and, for
 * qcow2, `qemu-img check` finds no corruption or leak. Read-only and without a lease: the volume
 * is ILLEGAL (nobody else opens it) and its disk's engine lock belongs to the transfer.
 */
async function verifyVolume(ref: pb.VolumeRef, expectedSizeBytes: number, signal: AbortSignal): Promise<string[]> {
  const v = await resolveVolume('verified volume', ref);
  const chain = await openVolumeChain(v, { topOnly: true });
  try {
    const format = chain.formats[0]!;
    const spec = chain.spec(3);
    const info = await qemuImgTopInfo(spec, format, chain.handles, signal);
    if (info.virtualSize !== expectedSizeBytes) {
      throw fail(Reason.TRANSFER_VERIFY_FAILED, `volume ${v.volumeId} has ${info.virtualSize} guest bytes after the upload; its disk has ${expectedSizeBytes}`);
    }
    if (format !== 'QCOW2') return ['size'];
    // 0: clean; 3: leaked clusters only (harmless space); 2: corruption; 1: check not completed.
    const { code, stdout } = await runQemuImg(['check', '-U', '--output=json', '-f', 'qcow2', spec], { signal, files: chain.handles, okCodes: [2, 3] });
    if (code === 2) {
      const corruptions = (JSON.parse(stdout || '{}') as { corruptions?: number }).corruptions ?? 0;
      throw fail(Reason.TRANSFER_VERIFY_FAILED, `qemu-img check found ${corruptions} corruption(s) in volume ${v.volumeId} after the upload`);
    }
    return ['size', 'qemu-img check'];
  } finally {
    await chain.close();
  }
}
