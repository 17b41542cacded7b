/**
 * The contract between the transfer control plane (the scheduler's StartImageTransfer, through the
 * data-mover's Open/Get/CloseImageTransfer RPCs) and the data endpoint of this data-mover (the
 * HTTPS server in this directory). A ticket is what one transfer may do: one disk's chain, one
 * direction, bytes within [0, size), until it expires. Its id is the secret part of the URL.
 */
import crypto from 'node:crypto';

export type TransferDirection = 'upload' | 'download';
/**
 * `raw`: the guest-visible data (the export is read/written through qemu, so a qcow2 volume is
 * served as the disk a guest sees). `qcow2`: reserved for the image bytes themselves; the
 * endpoint serves guest data only (docs/image-transfer.md).
 */
export type TransferFormat = 'raw' | 'qcow2';

export interface TransferTicket {
  /** 256-bit random, base64url: the secret part of the URL `/images/<ticketId>`. */
  ticketId: string;
  /** The operation id of the transfer. */
  transferId: string;
  /**
   * The identity URI (e.g. `sdmesh://user/alice`) of who started it: the client certificate must
   * name it. Empty only when the scheduler runs --insecure: then no identity is checked.
   */
  owner: string;
  diskId: string;
  domainId: string;
  /** The domain's mount path on this host (the caller checked it lies beneath a storage root). */
  domainPath: string;
  imageId: string;
  /** The chain the export opens, base first, leaf last. */
  volumeIds: string[];
  /** The leaf's generation, checked under the leases when the export opens. */
  generation: number;
  direction: TransferDirection;
  format: TransferFormat;
  /** Guest size in bytes: ranges outside [0, size) are refused (416). */
  size: number;
  /** download: `/extents?context=dirty` reports the dirty extents of this qcow2 bitmap of the leaf. */
  bitmap?: string;
  /** ms since the epoch; moved forward by activity (idleTimeoutMs), never past maxExpiresAt when set. */
  expiresAt: number;
  idleTimeoutMs: number;
  /** Upper bound of expiresAt extensions (ms since the epoch); unset: no bound other than the idle timeout. */
  maxExpiresAt?: number;
}

export interface TransferStats {
  /** Guest bytes sent to clients (GET). */
  bytesRead: number;
  /** Guest bytes received from clients (PUT; zeroed ranges are not counted). */
  bytesWritten: number;
  lastActivityAt: number;
  /** The export is open and the ticket accepted. */
  active: boolean;
  /** Why the export failed (its process died, a lease was lost): the transfer must be rolled back. */
  failed?: string;
}

export interface TransferRegistry {
  /** Opens the export (leases held by its own process) and accepts the ticket; returns the URL clients use. */
  open(t: TransferTicket): Promise<{ url: string }>;
  /** Refuses further requests, waits for the ones in flight, flushes when asked, stops the export (leases released). */
  close(ticketId: string, opts: { flush: boolean }): Promise<TransferStats>;
  stats(ticketId: string): TransferStats | undefined;
}

/** A fresh ticket id: 32 random bytes, base64url (43 characters). */
export function newTicketId(): string {
  return crypto.randomBytes(32).toString('base64url');
}

/** What a ticket id looks like; anything else is not looked up. */
export const TICKET_ID = /^[A-Za-z0-9_-]{43}$/;
