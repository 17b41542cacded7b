/**
 * Listing operations at scale: ListOperations from the replica's KV-watched operation index
 * next to a full re-read of the operations bucket in the same run (what ListOperations did
 * before, and what the takeover scan still does every beat), on a real nats-server.
 * Records are written directly with the operation store: N ended Move Disk operations of 6
 * steps each, in one domain; also the index's start (one full read + the watch) and its memory.
 *
 *   npm run bench -- operations-list [operations=2000]
 *   (node --expose-gc scripts/run-bench.js operations-list … for the index's memory alone)
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { connect } from '@nats-io/transport-node';
import { createLogger, openKv } from '@sdmesh/common';
import { NatsServer } from '@sdmesh/localmesh';
import { NatsKvStore } from '@sdmesh/scheduler/dist/kv-store';
import { OperationIndex } from '@sdmesh/scheduler/dist/operation-index';
import { OperationStore } from '@sdmesh/scheduler/dist/operation-store';
import { listOperations } from '@sdmesh/scheduler/dist/queries';
import { endedMoveRecord, measure, printTable, runBench } from './lib';

async function main(): Promise<void> {
  const n = Number(process.argv[2] ?? 2000);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-ops-'));
  const nats = await new NatsServer(path.join(dir, 'nats'), { insecure: true }).start();
  const nc = await connect(nats.connectOptions('scheduler'));
  try {
    const store = new OperationStore(new NatsKvStore(await openKv(nc, 'bench_operations')));
    const domainId = randomUUID();
    for (let i = 0; i < n; i += 100) await Promise.all(Array.from({ length: Math.min(100, n - i) }, (_, j) => store.create(endedMoveRecord(i + j, domainId))));

    // With --expose-gc the memory figure is the index's own (else it includes the read's garbage).
    const gc = (globalThis as { gc?: () => void }).gc;
    gc?.();
    const heapBefore = process.memoryUsage().heapUsed;
    const index = new OperationIndex({ store, log: createLogger('bench', 'silent', 'bench') });
    const started = Date.now();
    index.start();
    await index.ready;
    const startMs = Date.now() - started;
    gc?.();
    const heapMb = (process.memoryUsage().heapUsed - heapBefore) / 1e6;

    const rows = [
      await measure(`full re-read of ${n}`, 5, async () => void (await store.list()), 1),
      await measure('index: page of 100', 50, async () => void (await listOperations(index, store, { filter: '', pageSize: 100, pageToken: '' }))),
      await measure('index: type+domain, 100', 50, async () => {
        await listOperations(index, store, { filter: `type=MOVE_DISK AND domain=${domainId}`, pageSize: 100, pageToken: '' });
      }),
      await measure('index: disk, 0 matches', 50, async () => {
        await listOperations(index, store, { filter: `disk=${randomUUID()}`, pageSize: 100, pageToken: '' });
      }),
    ];
    printTable(rows, `full re-read of ${n}`);
    console.log(
      `index start (one full read, then the KV watch): ${startMs} ms; its memory: ~${heapMb.toFixed(1)} MB (${((heapMb * 1e6) / n).toFixed(0)} B/operation${gc ? '' : ', with garbage: run with --expose-gc'})`,
    );
    index.stop();
  } finally {
    await nc.close();
    await nats.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBench(main);
