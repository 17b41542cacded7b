import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { GrpcStatus, pb, SdmeshError } from '@sdmesh/common';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';

const DOMAIN_ID = '6b1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d';
const uuid = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;

/**
 * Update and delete take the volume's lease (without waiting) on top of the domain lease, so
 * they can't race a data job that rewrites the volume's record under the volume lease alone.
 */
describe('metadata-tx and volumes in use by a data job', () => {
  let root: string;
  let domainPath: string;
  let tx: MetadataTransactions;
  const leases = new InProcessDomainLeaseProvider();
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-mdtx-vl-');
    domainPath = path.join(root, 'domain');
    tx = new MetadataTransactions({ leases, registry: new Registry(), hostId: 1 });
    await tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name: 'd', path: domainPath }));
  });
  afterAll(() => fs.rm(root, { recursive: true, force: true }));

  it('refuses update, delete volume and delete image with ABORTED VOLUME_IN_USE while the volume lease is held, and changes nothing', async () => {
    const v = await tx.createVolume(
      pb.CreateVolumeRequest.fromPartial({
        domainPath,
        imageId: uuid(1),
        volumeId: uuid(2),
        format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
        capacityBytes: 1 << 20,
      }),
    );
    const before = await fs.readFile(v.path + '.meta');
    let release!: () => void;
    const jobRunning = new Promise<void>((r) => (release = r));
    let holding!: () => void;
    const held = new Promise<void>((r) => (holding = r));
    const job = leases.tryVolumeLease({ id: DOMAIN_ID, path: domainPath }, v.id, 3, 'copy-job', async () => {
      holding();
      await jobRunning;
    });
    await held;
    const refusals = await Promise.all([
      tx
        .updateVolume(pb.UpdateVolumeRequest.fromPartial({ domainPath, imageId: v.imageId, volumeId: v.id, generation: v.generation, description: 'x' }))
        .catch((e: SdmeshError) => e),
      tx.deleteVolume(pb.DeleteVolumeRequest.fromPartial({ domainPath, imageId: v.imageId, volumeId: v.id })).catch((e: SdmeshError) => e),
      tx.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: v.imageId })).catch((e: SdmeshError) => e),
    ]);
    for (const r of refusals) {
      expect(r).toBeInstanceOf(SdmeshError);
      expect([GrpcStatus[(r as SdmeshError).code], (r as SdmeshError).reason]).toEqual(['ABORTED', 'VOLUME_IN_USE']);
    }
    expect(await fs.readFile(v.path + '.meta')).toEqual(before);
    release();
    await job;
    const updated = await tx.updateVolume(
      pb.UpdateVolumeRequest.fromPartial({ domainPath, imageId: v.imageId, volumeId: v.id, generation: v.generation, description: 'after the job' }),
    );
    expect(updated.description).toBe('after the job');
    await tx.deleteImage(pb.DeleteImageRequest.fromPartial({ domainPath, imageId: v.imageId }));
    expect((await tx.listVolumes(pb.ListVolumesRequest.fromPartial({ domainPath }))).volumes).toEqual([]);
  });
});
