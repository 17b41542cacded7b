/**
 * Volume creates per second: through sdmesh (metadata-tx gRPC service, every create a
 * storage transaction under the domain's sanlock lease taken through the lease-manager), on
 * one domain and on 4 domains in parallel — next to the same creates done by one process
 * with no leases and no gRPC (the engine with an in-process mutex): the cost of safety.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Registry } from 'prom-client';
import { createClient, pb } from '@sdmesh/common';
import { LocalMesh } from '@sdmesh/localmesh';
import { printColumns, runBench } from './lib';
import { InProcessDomainLeaseProvider } from '@sdmesh/metadata-tx/dist/leases';
import { MetadataTransactions } from '@sdmesh/metadata-tx/dist/transactions';

const IN_FLIGHT_PER_DOMAIN = 4;

interface Creator {
  formatDomain(req: Partial<pb.FormatDomainRequest>): Promise<unknown>;
  createVolume(req: Partial<pb.CreateVolumeRequest>): Promise<unknown>;
}

async function createMany(creator: Creator, domainPath: string, n: number): Promise<void> {
  let left = n;
  await Promise.all(
    Array.from({ length: IN_FLIGHT_PER_DOMAIN }, async () => {
      while (left > 0) {
        left--;
        await creator.createVolume({
          domainPath,
          imageId: randomUUID(),
          volumeId: randomUUID(),
          format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
          allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
          capacityBytes: 1 << 30,
        });
      }
    }),
  );
}

async function run(
  label: string,
  creator: Creator,
  root: string,
  domains: number,
  perDomain: number,
): Promise<{ label: string; domains: number; creates: number; seconds: number; perSecond: number }> {
  const paths = Array.from({ length: domains }, (_, i) => path.join(root, `${label.replace(/\W+/g, '-')}-${domains}-${i}`));
  for (const p of paths)
    await creator.formatDomain({ domainId: randomUUID(), name: path.basename(p), path: p, ioTimeoutSeconds: 1, maxVolumes: perDomain + 10 });
  const t = process.hrtime.bigint();
  await Promise.all(paths.map((p) => createMany(creator, p, perDomain)));
  const seconds = Number(process.hrtime.bigint() - t) / 1e9;
  return { label, domains, creates: domains * perDomain, seconds, perSecond: (domains * perDomain) / seconds };
}

async function main(): Promise<void> {
  const perDomain = Number(process.argv[2] ?? 100);
  const dir = fs.mkdtempSync(path.join(process.env.SDMESH_TEST_DIR ?? '/var/tmp', 'sdmesh-bench-mdtx-'));
  const mesh = new LocalMesh({ dir, hosts: 1, perHostServices: ['lease-manager', 'metadata-tx'], scheduler: false, logLevel: 'warn' });
  try {
    await mesh.start();
    const client = createClient(pb.MetadataTxServiceDefinition, mesh.hosts[0]!.services['metadata-tx']!.grpcAddress, mesh.credentials({ kind: 'scheduler' }));
    const sdmesh: Creator = {
      formatDomain: (r) => client.formatDomain(r, { timeoutMs: 60000 }),
      createVolume: (r) => client.createVolume(r, { timeoutMs: 120000 }),
    };
    const engine = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry() });
    const bare: Creator = {
      formatDomain: (r) => engine.formatDomain(pb.FormatDomainRequest.fromPartial(r)),
      createVolume: (r) => engine.createVolume(pb.CreateVolumeRequest.fromPartial(r)),
    };
    const storage = mesh.storageDir;

    console.log(`raw sparse 1 GiB volume creates, ${perDomain} per domain, ${IN_FLIGHT_PER_DOMAIN} in flight per domain, 1 host\n`);
    const rows = [
      await run('baseline: one process, no leases', bare, storage, 1, perDomain),
      await run('sdmesh (gRPC + sanlock domain lease)', sdmesh, storage, 1, perDomain),
      await run('baseline: one process, no leases', bare, storage, 4, perDomain),
      await run('sdmesh (gRPC + sanlock domain lease)', sdmesh, storage, 4, perDomain),
    ];
    const header = ['case', 'domains', 'creates', 'seconds', 'creates/s', 'vs baseline'];
    const lines = rows.map((r, i) => {
      const base = rows[i % 2 === 0 ? i : i - 1]!;
      return [r.label, String(r.domains), String(r.creates), r.seconds.toFixed(2), r.perSecond.toFixed(1), `${(r.perSecond / base.perSecond).toFixed(2)}x`];
    });
    printColumns(header, lines);
    client.close();
  } finally {
    await mesh.stop();
    if (!process.env.SDMESH_KEEP_TEST_DIRS) fs.rmSync(dir, { recursive: true, force: true });
  }
}

runBench(main);
