import { Counter, Gauge, type Registry } from 'prom-client';

/** Image transfer metrics of the data-mover (docs/image-transfer.md). */
export class TransferMetrics {
  readonly bytes: Counter<'direction'>;
  readonly zeroedBytes: Counter;
  readonly active: Gauge<'direction'>;
  readonly throughput: Gauge<'direction'>;
  readonly requests: Counter<'method' | 'status'>;
  /** Bytes moved in the last RATE_WINDOW_MS, per direction, for the throughput gauge. */
  private readonly recent: Record<'read' | 'written', { at: number; bytes: number }[]> = { read: [], written: [] };

  constructor(registry: Registry) {
    const registers = [registry];
    this.bytes = new Counter({
      name: 'sdmesh_data_mover_transfer_bytes_total',
      help: 'Guest bytes moved by image transfers on the wire: direction="read" sent to clients (GET), "written" received from them (PUT). Zeroed ranges are not counted.',
      labelNames: ['direction'],
      registers,
    });
    this.zeroedBytes = new Counter({
      name: 'sdmesh_data_mover_transfer_zeroed_bytes_total',
      help: 'Guest bytes image transfers zeroed on request (PATCH zero): no data crossed the wire for them.',
      registers,
    });
    this.active = new Gauge({
      name: 'sdmesh_data_mover_transfers_active',
      help: 'Image transfers with an open export on this host, by direction (upload, download).',
      labelNames: ['direction'],
      registers,
    });
    this.throughput = new Gauge({
      name: 'sdmesh_data_mover_transfer_throughput_mbps',
      help: 'Image transfer throughput of this host over the last 10 s, MB/s (10^6 bytes), by direction (read, written).',
      labelNames: ['direction'],
      registers,
      collect: () => this.collectRates(),
    });
    this.requests = new Counter({
      name: 'sdmesh_data_mover_transfer_requests_total',
      help: 'HTTP requests of the image transfer endpoint, by method and status.',
      labelNames: ['method', 'status'],
      registers,
    });
    for (const d of ['read', 'written']) this.bytes.inc({ direction: d }, 0);
    for (const d of ['upload', 'download']) this.active.set({ direction: d }, 0);
  }

  moved(direction: 'read' | 'written', bytes: number): void {
    this.bytes.inc({ direction }, bytes);
    const list = this.recent[direction];
    list.push({ at: Date.now(), bytes });
    // Bounded without scrapes too.
    while (list.length > 0 && list[0]!.at < Date.now() - RATE_WINDOW_MS) list.shift();
  }

  private collectRates(): void {
    const since = Date.now() - RATE_WINDOW_MS;
    for (const direction of ['read', 'written'] as const) {
      const list = this.recent[direction].filter((e) => e.at >= since);
      this.recent[direction] = list;
      this.throughput.set({ direction }, list.reduce((s, e) => s + e.bytes, 0) / (RATE_WINDOW_MS / 1000) / 1e6);
    }
  }
}

const RATE_WINDOW_MS = 10_000;
