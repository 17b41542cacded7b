import { pb, Reason, SdmeshError } from '@sdmesh/common';
import type { Cluster } from '../../services/scheduler/src/cluster';

/** The leaf volume of the fake cluster's disks (one volume per disk). */
export const FAKE_LEAF = '3e9b7c55-4444-4555-8666-777788889999';

/**
 * A fake Cluster for the scheduler's disk attachments (attachments.ts): hosts h1..h3 healthy,
 * every domain active, every disk one LEGAL leaf at generation 3 whose bumps go through a fake
 * metadata-tx (`lease.held`: they fail as while someone holds the leaf's lease).
 */
export function fakeAttachmentCluster() {
  const leaf = { id: FAKE_LEAF, generation: 3, legality: pb.Legality.LEGALITY_LEGAL };
  const hosts = new Map(['h1', 'h2', 'h3'].map((name) => [name, { healthy: true, liveness: new Map<string, pb.HostLiveness>() }]));
  const bumps: pb.UpdateVolumeRequest[] = [];
  const lease = { held: false };
  const cluster = {
    domains: { get: async (id: string) => ({ id, path: '/storage/d', maintenance: false, removing: false }) },
    hosts: { get: (name: string) => hosts.get(name), reaches: () => true },
    volumes: async () => [{ ...leaf }],
    read: async (_ids: string[], fn: (h: unknown) => Promise<unknown>) =>
      fn({
        clients: {
          metadata: {
            updateVolume: async (req: pb.UpdateVolumeRequest) => {
              if (lease.held) throw new SdmeshError(10, `volume ${req.volumeId} is in use`, Reason.VOLUME_IN_USE);
              bumps.push(req);
              leaf.generation++;
              return { ...leaf };
            },
          },
        },
      }),
  } as unknown as Cluster;
  return { cluster, leaf, hosts, bumps, lease };
}
