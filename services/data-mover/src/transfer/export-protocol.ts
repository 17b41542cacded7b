/** IPC messages between the data-mover service and one export worker (export-worker.ts). */
import type { WireError } from '../worker-protocol';
import type { TransferTicket } from './tickets';

export interface ExportConfig {
  leaseManagerAddress: string;
  hostName: string;
  logLevel: string;
  storageGroupId?: number;
  /** A private directory (0700) of the service for the NBD socket. */
  runDir: string;
  /** How long to wait for the shared leases of the chain while other readers on this host hold them. */
  sharedLeaseWaitMs: number;
}

export type ServiceToExport = { type: 'open'; ticket: TransferTicket; config: ExportConfig } | { type: 'close' };

export type ExportToService =
  | { type: 'ready'; socket: string; size: number }
  | { type: 'failed'; error: WireError }
  /** qemu-nbd stopped (bitmaps stored, data synced), the leases released. */
  | { type: 'closed' };
