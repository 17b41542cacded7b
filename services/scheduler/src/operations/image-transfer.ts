import { randomBytes } from 'node:crypto';
import {
  fail,
  failedPrecondition,
  hasReason,
  invalidArgument,
  isGenerationMismatch,
  notFound,
  pb,
  permissionDenied,
  Reason,
  SdmeshError,
  validateBitmapName,
} from '@sdmesh/common';
import { sleep } from '../cluster';
import type { DomainEntry } from '../domains';
import type { FlowContext, StepRun } from '../engine';
import type { HostState } from '../hosts';
import { checkUuid, operationName } from '../ids';
import type { OperationRecord } from '../operation-store';
import { isTerminal } from '../operation-store';
import { CALL_TIMEOUT_MS, isHostUnreachable } from '../policies';
import { checkEnum, diskLock, diskResource, domainLock, registeredDomain, type OperationKind, type RunEnv } from './operation';
import { onPlacedHost, retryInStep, stepCall } from './placed-steps';
import { fenceDestination } from './volume-copy';
import { diskBitmaps } from './volume-jobs';

/**
 * Image transfer (issue 19; docs/image-transfer.md "API and lifecycle"): the control plane of an
 * upload or download of a disk's guest data through the HTTPS endpoint of one host's data-mover.
 *
 * Steps: (upload) `mark-illegal` — metadata-tx UpdateVolume: the leaf ILLEGAL, generation + 1, in
 * one record write, before any byte can be written → `open` — placed on a healthy host reaching
 * the domain, data-mover OpenTransfer: the export takes the chain's leases (exclusive for an
 * upload, shared for a download) and checks the generation; its URL is the step's result, and
 * only from then on can the user who started it get it (GetImageTransfer) → `transfer` — the
 * operation stays RUNNING, polling the data-mover's counters for progress, until
 * FinalizeImageTransfer (an engine request), the inactivity timeout, the maximum duration, a
 * failed export or a lost host → `close` — CloseTransfer with flush; an upload's leaf verified there
 * (virtual size, qemu-img check of a qcow2) → (upload) `commit` — UpdateVolume: LEGAL, generation + 1.
 *
 * Rollback: the endpoint is closed where it may be open; a download changes nothing else. An upload
 * whose URL was never given out (the open step did not complete) is put back LEGAL with a
 * generation bump: no byte can have reached it. Once the URL was out the leaf may hold partial
 * data, so it stays ILLEGAL and is fenced (generation + 1, which waits until no live host holds its
 * lease): the disk is never seen LEGAL with partial data; the user uploads again (an upload
 * accepts a one-volume ILLEGAL disk) or deletes it. The operation's error says so.
 *
 * Refused before anything is stored: unknown domain or disk, a direction other than UPLOAD or
 * DOWNLOAD, the QCOW2 wire format (the endpoint serves guest data), a thin clone (its chain spans
 * the template's image), a download of a disk with an ILLEGAL volume, an unknown or unusable
 * bitmap; for an upload: a template, a disk with snapshots (the upload replaces the guest data of
 * a one-volume disk only), a bitmap, an image larger than the disk. Locks: the disk exclusive for
 * an upload and shared for a download (downloads and copies of one disk run together), its domain
 * shared: a disk another operation is changing is refused ABORTED LOCKED.
 */
export type TransferDirectionName = 'upload' | 'download';

export interface ImageTransferParams {
  domainId: string;
  diskId: string;
  direction: TransferDirectionName;
  /** The chain, base first, leaf last. */
  volumeIds: string[];
  /** The leaf's generation when the transfer was prepared. */
  generation: number;
  /** The leaf's legality then (an upload onto an ILLEGAL disk leaves it ILLEGAL when rolled back). */
  leafWasLegal: boolean;
  capacityBytes: number;
  /** Bytes the ticket allows: [0, sizeBytes). */
  sizeBytes: number;
  bitmap: string;
  /** Identity URI of the user who started it; '' when the scheduler runs --insecure. */
  owner: string;
  /** The secret part of the URL (256 random bits, base64url): stored with the operation, shown only to the owner. */
  ticketId: string;
  idleTimeoutMs: number;
  /** The transfer fails TRANSFER_EXPIRED this long after it was created. */
  maxDurationMs: number;
}

/** The open step's result. */
export interface OpenedTransfer {
  host: string;
  url: string;
}

/** The public request, plus who made it (the handler adds it: part of the request's fingerprint). */
export type StartImageTransferRequest = pb.StartImageTransferRequest & { owner: string };

export const DEFAULT_IDLE_TIMEOUT_S = 60;
export const MAX_IDLE_TIMEOUT_S = 3600;
/** How long a transfer may stay open at all. */
export const TRANSFER_MAX_DURATION_MS = 24 * 3600_000;
/** How often the transfer step reads the endpoint's counters. */
export const TRANSFER_POLL_MS = 1000;
/** A serving host that answers no counters read for this long has lost the transfer... */
export const TRANSFER_HOST_LOST_MS = 15_000;
/** ...or for this long while the host poll calls it down. */
export const TRANSFER_HOST_DOWN_MS = 3000;
export const FINALIZE = 'finalize';
/** Scratch key: the hosts an OpenTransfer was sent to. */
const OPEN_HOSTS = 'open-hosts';

const directionName = (d: pb.TransferDirection): TransferDirectionName => (d === pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD ? 'upload' : 'download');

/** Checks of the request that need no storage read (unit-tested). */
export function validateTransferRequest(req: pb.StartImageTransferRequest): { direction: TransferDirectionName; idleTimeoutMs: number; bitmap: string } {
  if (req.direction !== pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD && req.direction !== pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD) {
    throw invalidArgument(`direction must be UPLOAD or DOWNLOAD (got ${req.direction})`, Reason.INVALID_TRANSFER_DIRECTION);
  }
  checkEnum('format', req.format, pb.TransferFormat, Reason.INVALID_FORMAT);
  if (req.format === pb.TransferFormat.TRANSFER_FORMAT_QCOW2) {
    throw invalidArgument(
      "transfers serve the disk's guest data (format RAW); convert a qcow2 file on the client side (sdmctl disks upload does)",
      Reason.UNSUPPORTED_TRANSFER_FORMAT,
    );
  }
  const direction = directionName(req.direction);
  const seconds = req.inactivityTimeoutSeconds || DEFAULT_IDLE_TIMEOUT_S;
  if (!Number.isInteger(seconds) || seconds < 1 || seconds > MAX_IDLE_TIMEOUT_S) {
    throw invalidArgument(
      `inactivity_timeout_seconds must be 1..${MAX_IDLE_TIMEOUT_S} (0 = ${DEFAULT_IDLE_TIMEOUT_S}); got ${req.inactivityTimeoutSeconds}`,
      Reason.INVALID_TIMEOUT,
    );
  }
  if (req.bitmap && direction === 'upload')
    throw invalidArgument('a bitmap selects the extents of a download; an upload takes none', Reason.INVALID_BITMAP_NAME);
  const bitmap = req.bitmap ? validateBitmapName(req.bitmap) : '';
  if (req.uploadSizeBytes < 0 || (req.uploadSizeBytes && direction === 'download')) {
    throw invalidArgument(`upload_size_bytes must be 0 or positive, and only for an upload (got ${req.uploadSizeBytes})`, Reason.INVALID_CAPACITY);
  }
  return { direction, idleTimeoutMs: seconds * 1000, bitmap };
}

/** Checks of the disk (its volumes, base first) for this transfer. */
export function checkTransferDisk(diskId: string, volumes: pb.Volume[], direction: TransferDirectionName, uploadSizeBytes: number): void {
  if (volumes.some((v) => v.parentImageId !== '')) {
    throw failedPrecondition(`disk ${diskId} is a thin clone: its chain includes its template's volume; copy it with collapse first`, Reason.DISK_IS_CLONE);
  }
  const leaf = volumes[volumes.length - 1]!;
  if (direction === 'download') {
    const bad = volumes.find((v) => v.legality !== pb.Legality.LEGALITY_LEGAL);
    if (bad) throw failedPrecondition(`volume ${bad.id} of disk ${diskId} is ILLEGAL: its data is not complete`, Reason.DISK_ILLEGAL);
    return;
  }
  if (volumes.some((v) => v.template)) throw failedPrecondition(`disk ${diskId} is a template: read-only for good`, Reason.DISK_IS_TEMPLATE);
  if (volumes.length > 1) {
    throw failedPrecondition(
      `disk ${diskId} has ${volumes.length} volumes: an upload replaces the guest data of a one-volume disk only (delete its snapshots, or copy it with collapse)`,
      Reason.DISK_HAS_SNAPSHOTS,
    );
  }
  if (uploadSizeBytes > leaf.capacityBytes) {
    throw invalidArgument(
      `the image (${uploadSizeBytes} bytes) is larger than disk ${diskId} (${leaf.capacityBytes} bytes): extend the disk first`,
      Reason.IMAGE_LARGER_THAN_DISK,
    );
  }
}

export const startImageTransfer: OperationKind<StartImageTransferRequest, ImageTransferParams> = {
  type: pb.OperationType.OPERATION_TYPE_IMAGE_TRANSFER,
  waitForLocks: (req) => req.waitForLocks,

  async prepare(env, req) {
    const { direction, idleTimeoutMs, bitmap } = validateTransferRequest(req);
    const entry = await registeredDomain(env, req.storageDomainId);
    const diskId = checkUuid('disk_id', req.diskId, Reason.INVALID_DISK_ID);
    const volumes = await env.cluster.volumes(entry, diskId, env.call);
    checkTransferDisk(diskId, volumes, direction, req.uploadSizeBytes);
    const leaf = volumes[volumes.length - 1]!;
    if (bitmap) {
      const leafBitmaps = (await diskBitmaps(env.cluster, entry, diskId, [leaf], env.call))[0]!;
      const b = leafBitmaps.bitmaps.find((x) => x.name === bitmap);
      if (!b) throw notFound(`the leaf of disk ${diskId} has no dirty bitmap named ${bitmap}`, Reason.BITMAP_NOT_FOUND);
      if (b.inUse || !b.enabled) {
        throw failedPrecondition(
          `dirty bitmap ${bitmap} of disk ${diskId} is ${b.inUse ? 'in-use (not stored cleanly)' : 'disabled'}: it may miss writes; take a full backup`,
          Reason.FAILED_PRECONDITION,
        );
      }
    }
    return {
      params: {
        domainId: entry.id,
        diskId,
        direction,
        volumeIds: volumes.map((v) => v.id),
        generation: leaf.generation,
        leafWasLegal: leaf.legality === pb.Legality.LEGALITY_LEGAL,
        capacityBytes: leaf.capacityBytes,
        sizeBytes: direction === 'upload' ? req.uploadSizeBytes || leaf.capacityBytes : leaf.capacityBytes,
        bitmap,
        owner: req.owner,
        ticketId: randomBytes(32).toString('base64url'),
        idleTimeoutMs,
        maxDurationMs: TRANSFER_MAX_DURATION_MS,
      },
      locks: [diskLock(diskId, direction === 'upload' ? 'exclusive' : 'shared'), domainLock(entry.id, 'shared')],
      targetResources: [diskResource(entry.id, diskId)],
    };
  },

  async run(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    const leafId = p.volumeIds[p.volumeIds.length - 1]!;
    const leafRef = { domainPath: entry.path, imageId: p.diskId, volumeId: leafId };
    // A request that waited for its locks finds the disk as the operations before it left it.
    const volumes = await env.cluster.volumes(entry, p.diskId, { signal: ctx.signal });
    if (volumes.map((v) => v.id).join() !== p.volumeIds.join()) {
      throw failedPrecondition(`disk ${p.diskId}'s volumes changed while the transfer waited for its locks: start it again`, Reason.FAILED_PRECONDITION);
    }
    checkTransferDisk(p.diskId, volumes, p.direction, 0);
    let generation = p.generation;
    if (p.direction === 'upload') {
      generation = await ctx.step('mark-illegal', (run) =>
        setLegality(env, ctx, run, entry, leafId, { from: p.generation, legality: pb.Legality.LEGALITY_ILLEGAL }),
      );
    }
    const expiresAtMs = (ctx.rec.op.createTime?.getTime() ?? Date.now()) + p.maxDurationMs;
    const opened = await ctx.step('open', (run) =>
      onPlacedHost(env, ctx, run, { kind: 'image_transfer', domainIds: [entry.id] }, async (h): Promise<OpenedTransfer> => {
        // Every host an open was sent to, before it is sent: a rollback closes the endpoint on each.
        const tried = ctx.scratch<string[]>(OPEN_HOSTS) ?? [];
        if (!tried.includes(h.spec.name)) await ctx.saveScratch(OPEN_HOSTS, [...tried, h.spec.name]);
        const st = await h.clients.mover.openTransfer(
          {
            ticket: p.ticketId,
            transferId: ctx.id,
            owner: p.owner,
            domainPath: entry.path,
            domainId: entry.id,
            imageId: p.diskId,
            volumeIds: p.volumeIds,
            generation,
            direction: p.direction,
            format: 'raw',
            sizeBytes: p.sizeBytes,
            bitmap: p.bitmap,
            idleTimeoutMs: p.idleTimeoutMs,
            maxExpiresAtMs: expiresAtMs,
          },
          stepCall(ctx, CALL_TIMEOUT_MS.openTransfer),
        );
        return { host: h.spec.name, url: st.url };
      }),
    );
    await ctx.step('transfer', (run) => followTransfer(env, ctx, run, opened, expiresAtMs));
    await ctx.step('close', async (run) => {
      await run.setHost(opened.host);
      const st = await servingHost(env, opened).clients.mover.closeTransfer(
        { ticket: p.ticketId, flush: true, verify: p.direction === 'upload' ? leafRef : undefined, expectedSizeBytes: p.capacityBytes },
        stepCall(ctx, CALL_TIMEOUT_MS.closeTransfer),
      );
      return { bytesRead: st.bytesRead, bytesWritten: st.bytesWritten, verified: st.verified };
    });
    if (p.direction === 'upload') {
      await ctx.step('commit', (run) => setLegality(env, ctx, run, entry, leafId, { from: generation, legality: pb.Legality.LEGALITY_LEGAL }));
    }
    return { $case: 'disk', disk: await env.cluster.disk(entry, p.diskId, { signal: ctx.signal }) };
  },

  async rollback(env, ctx) {
    const p = ctx.rec.params;
    const entry = await env.cluster.domains.get(p.domainId);
    const results = (ctx.rec.state.results ?? {}) as Record<string, unknown>;
    const opened = results.open as OpenedTransfer | undefined;
    // An open may have reached a host without its answer coming back: close on every host one was sent to.
    const hosts = new Set([...(ctx.scratch<string[]>(OPEN_HOSTS) ?? []), ...(opened ? [opened.host] : [])]);
    if (hosts.size > 0) {
      await ctx.step('rollback:close', async () => {
        for (const h of hosts) await closeQuietly(env, ctx, h, p.ticketId);
        return null;
      });
    }
    if (p.direction === 'download') return;
    const leafId = p.volumeIds[p.volumeIds.length - 1]!;
    const location = { domain: entry, imageId: p.diskId, volumeId: leafId };
    if (opened || !p.leafWasLegal) {
      // The URL was out (the leaf may hold partial data), or the disk was ILLEGAL before: it stays
      // ILLEGAL, fenced so that no late writer of the export can write it any more.
      await ctx.step('rollback:fence', () => fenceDestination(env, ctx, location).then(() => null));
      return;
    }
    // Nobody had the URL: the leaf holds what it held. Back to LEGAL once its lease is free.
    await ctx.step('rollback:restore-legal', () =>
      retryInStep(
        ctx,
        env.policies.fence,
        async () => {
          const vol = await readVolume(env, ctx, entry, p.diskId, leafId);
          // Only this transfer's own mark is undone (generation + 1 and ILLEGAL), never an ILLEGAL it found.
          if (vol.legality === pb.Legality.LEGALITY_LEGAL || vol.generation !== p.generation + 1) return null;
          await env.cluster.read([entry.id], (h) =>
            h.clients.metadata.updateVolume(
              {
                domainPath: entry.path,
                imageId: p.diskId,
                volumeId: leafId,
                generation: vol.generation,
                legality: pb.Legality.LEGALITY_LEGAL,
                bumpGeneration: true,
                operationId: ctx.id,
              },
              stepCall(ctx, CALL_TIMEOUT_MS.bumpGeneration),
            ),
          );
          return null;
        },
        `restore volume ${leafId} LEGAL`,
      ),
    );
  },
};

async function readVolume(env: RunEnv, ctx: FlowContext<unknown>, entry: DomainEntry, imageId: string, volumeId: string): Promise<pb.Volume> {
  const res = await env.cluster.read([entry.id], (h) =>
    h.clients.metadata.getVolume({ domainPath: entry.path, imageId, volumeId }, stepCall(ctx, CALL_TIMEOUT_MS.getVolume)),
  );
  return res.volume!;
}

/**
 * One record write on the leaf: the legality and generation + 1, from generation `from`. A retry
 * after a write whose answer was lost finds the generation moved: the record already at `from` + 1
 * with that legality is this step's own write (the disk's engine lock has been ours since prepare).
 */
async function setLegality(
  env: RunEnv,
  ctx: FlowContext<ImageTransferParams>,
  run: StepRun,
  entry: DomainEntry,
  volumeId: string,
  change: { from: number; legality: pb.Legality },
): Promise<number> {
  const ref = { domainPath: entry.path, imageId: ctx.rec.params.diskId, volumeId };
  return onPlacedHost(env, ctx, run, { kind: 'update_volume', domainIds: [entry.id] }, async (h) => {
    try {
      const v = await h.clients.metadata.updateVolume(
        { ...ref, generation: change.from, legality: change.legality, bumpGeneration: true, operationId: ctx.id },
        stepCall(ctx, CALL_TIMEOUT_MS.bumpGeneration),
      );
      return v.generation;
    } catch (err) {
      if (!isGenerationMismatch(err)) throw err;
      const v = await readVolume(env, ctx, entry, ref.imageId, volumeId);
      if (v.generation === change.from + 1 && v.legality === change.legality) return v.generation;
      throw err;
    }
  });
}

/** The host serving the transfer (TRANSFER_HOST_LOST when the scheduler no longer knows it). */
function servingHost(env: RunEnv, opened: OpenedTransfer): HostState {
  const h = env.cluster.hosts.get(opened.host);
  if (!h) throw fail(Reason.TRANSFER_HOST_LOST, `host ${opened.host}, which served the transfer, is no longer known`);
  return h;
}

/**
 * The transfer step: reads the endpoint's counters every TRANSFER_POLL_MS (progress: bytes moved
 * of the ticket's size) until FinalizeImageTransfer asks to end it; fails on inactivity, at the
 * maximum duration, on a failed export, and when the serving host stops answering (or the host
 * poll calls it down, or its data-mover forgot the ticket: restarted).
 */
export async function followTransfer(
  env: RunEnv,
  ctx: FlowContext<ImageTransferParams>,
  run: StepRun,
  opened: OpenedTransfer,
  expiresAtMs: number,
): Promise<null> {
  const p = ctx.rec.params;
  await run.setHost(opened.host);
  let unansweredSince: number | undefined;
  let last: { bytes: number; at: number } | undefined;
  for (;;) {
    if (await ctx.requested(FINALIZE)) return null;
    const h = servingHost(env, opened);
    let st: pb.TransferState;
    try {
      st = await h.clients.mover.getTransfer({ ticket: p.ticketId }, stepCall(ctx, CALL_TIMEOUT_MS.getTransfer));
      unansweredSince = undefined;
    } catch (err) {
      if (ctx.signal.aborted) throw ctx.signal.reason;
      if (hasReason(err, Reason.TRANSFER_NOT_FOUND)) {
        throw fail(Reason.TRANSFER_HOST_LOST, `the data-mover of ${opened.host} no longer knows the transfer (it restarted): the transfer is lost`);
      }
      if (!isHostUnreachable(err)) throw err;
      unansweredSince ??= Date.now();
      // The host poll calling it down is a second witness, not a first: a loaded host may miss one answer.
      const unanswered = Date.now() - unansweredSince;
      if (unanswered >= TRANSFER_HOST_LOST_MS || (!h.healthy && unanswered >= TRANSFER_HOST_DOWN_MS)) {
        throw fail(Reason.TRANSFER_HOST_LOST, `host ${opened.host}, which serves the transfer, stopped answering: ${SdmeshError.from(err).message}`);
      }
      await sleep(TRANSFER_POLL_MS, ctx.signal);
      continue;
    }
    if (st.failed) throw fail(Reason.TRANSFER_FAILED, `the transfer's endpoint on ${opened.host} failed: ${st.failed}`);
    const bytes = p.direction === 'upload' ? st.bytesWritten : st.bytesRead;
    const now = Date.now();
    const mbps = last && now > last.at ? (bytes - last.bytes) / 1048576 / ((now - last.at) / 1000) : 0;
    last = { bytes, at: now };
    const progress = {
      percent: p.sizeBytes ? Math.min(100, (bytes / p.sizeBytes) * 100) : 0,
      bytesDone: bytes,
      bytesTotal: p.sizeBytes,
      mbps: Math.max(0, mbps),
    };
    await run.progress(progress, progress);
    if (st.idleMs > p.idleTimeoutMs) {
      throw fail(
        Reason.TRANSFER_IDLE,
        `no request reached the transfer for ${Math.round(st.idleMs / 1000)} s (inactivity timeout ${p.idleTimeoutMs / 1000} s)`,
      );
    }
    if (now >= expiresAtMs) throw fail(Reason.TRANSFER_EXPIRED, `the transfer reached its maximum duration (${p.maxDurationMs / 1000} s)`);
    await sleep(TRANSFER_POLL_MS, ctx.signal);
  }
}

/** Closes the endpoint without flushing; a host that does not answer or no longer knows the ticket is left (its export dies with it). */
async function closeQuietly(env: RunEnv, ctx: FlowContext<unknown>, hostName: string, ticketId: string): Promise<null> {
  const h = env.cluster.hosts.get(hostName);
  if (!h) return null;
  await h.clients.mover
    .closeTransfer({ ticket: ticketId, flush: false, expectedSizeBytes: 0 }, stepCall(ctx, CALL_TIMEOUT_MS.closeTransfer))
    .catch((err: unknown) => {
      if (!isHostUnreachable(err) && !hasReason(err, Reason.TRANSFER_NOT_FOUND)) throw err;
      ctx.log.warn({ host: hostName, err: String(err) }, 'could not close the transfer endpoint; its export ends with its host');
    });
  return null;
}

// ---------------------------------------------------------------- the public calls besides Start

/** The record of an image transfer (NOT_FOUND as GetOperation; FAILED_PRECONDITION NOT_A_TRANSFER for another type). */
export function transferRecord(rec: OperationRecord): OperationRecord<ImageTransferParams> {
  if (rec.op.type !== pb.OperationType.OPERATION_TYPE_IMAGE_TRANSFER) {
    throw failedPrecondition(`${rec.op.name} is not an image transfer`, Reason.NOT_A_TRANSFER);
  }
  return rec as OperationRecord<ImageTransferParams>;
}

/** What GetImageTransfer shows; the URL only to `caller` when it started the transfer. */
export function imageTransferView(rec: OperationRecord<ImageTransferParams>, caller: string): pb.ImageTransfer {
  const p = rec.params;
  const opened = (rec.state.results as Record<string, unknown> | undefined)?.open as OpenedTransfer | undefined;
  const ended = isTerminal(rec.op.status);
  const phase = ended
    ? pb.TransferPhase.TRANSFER_PHASE_ENDED
    : rec.requests?.[FINALIZE] !== undefined || rec.cancelRequested
      ? pb.TransferPhase.TRANSFER_PHASE_FINALIZING
      : opened
        ? pb.TransferPhase.TRANSFER_PHASE_READY
        : pb.TransferPhase.TRANSFER_PHASE_INITIALIZING;
  const expire = (rec.op.createTime?.getTime() ?? 0) + p.maxDurationMs;
  return pb.ImageTransfer.fromPartial({
    name: operationName(rec.id),
    storageDomainId: p.domainId,
    diskId: p.diskId,
    direction: p.direction === 'upload' ? pb.TransferDirection.TRANSFER_DIRECTION_UPLOAD : pb.TransferDirection.TRANSFER_DIRECTION_DOWNLOAD,
    format: pb.TransferFormat.TRANSFER_FORMAT_RAW,
    phase,
    status: rec.op.status,
    url: opened && phase === pb.TransferPhase.TRANSFER_PHASE_READY && caller === p.owner ? opened.url : '',
    host: opened?.host ?? '',
    sizeBytes: p.sizeBytes,
    bytesTransferred: rec.op.progress?.bytesDone ?? 0,
    owner: p.owner,
    inactivityTimeoutSeconds: p.idleTimeoutMs / 1000,
    expireTime: new Date(expire),
    error: rec.op.error,
    bitmap: p.bitmap,
  });
}

/** Who asks to finalize or cancel a transfer: their identity URI ('' without TLS) and whether their role is admin. */
export interface TransferCaller {
  uri: string;
  admin: boolean;
}

/**
 * Finalize and cancel end what the owner is doing with the disk: only the user who started the
 * transfer, or an admin, may ask (another operator would cut someone else's upload short).
 * Without TLS (--insecure) the owner and every caller are '' alike.
 */
export function checkTransferController(rec: OperationRecord, caller: TransferCaller, action: 'finalize' | 'cancel'): OperationRecord<ImageTransferParams> {
  const t = transferRecord(rec);
  if (caller.admin || caller.uri === t.params.owner) return t;
  throw permissionDenied(
    `only the user who started ${t.op.name} (${t.params.owner || 'unknown: started without TLS'}) or an admin may ${action} it, not ${caller.uri}`,
    Reason.NOT_TRANSFER_OWNER,
  );
}

/** FinalizeImageTransfer's check, on the fresh record: a transfer whose endpoint is open (or one already being finalized). */
export function checkFinalizable(rec: OperationRecord): void {
  const t = transferRecord(rec);
  if (t.requests?.[FINALIZE] !== undefined) return;
  const opened = (t.state.results as Record<string, unknown> | undefined)?.open;
  if (isTerminal(t.op.status) || t.cancelRequested || !opened) {
    const what = isTerminal(t.op.status) || t.cancelRequested ? 'has ended (or is being cancelled)' : 'is not open yet (its URL is not ready)';
    throw failedPrecondition(`${t.op.name} ${what}: it can not be finalized now`, Reason.TRANSFER_NOT_ACTIVE);
  }
}
