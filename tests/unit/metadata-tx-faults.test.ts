import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { GrpcStatus, pb, SdmeshError } from '@sdmesh/common';
import { findGarbage } from '@sdmesh/common';
import { FAULT_POINTS } from '../../services/metadata-tx/src/faults';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { runFaultChild, runFaultChildGroup } from '../harness/metadata-tx-fault-child';

/**
 * Each case runs one operation in a child process (runFaultChild) with SDMESH_FAULT_POINT set,
 * checks the child died by SIGKILL, then checks from this process what a reader sees and that a
 * retry works.
 */
jest.setTimeout(120_000);

const DOMAIN_ID = '6b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d';
const IMAGE = '7c3d4e5f-6071-4b8c-9d0e-1f2a3b4c5d6e';
const BASE = '8d4e5f60-7182-4c9d-8e1f-2a3b4c5d6e7f';
const SNAP = '9e5f6071-8293-4dae-9f20-3b4c5d6e7f80';
const MiB = 1024 * 1024;

const engine = () => new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry(), hostId: 1 });

async function newDomain(root: string, name: string): Promise<string> {
  const domainPath = path.join(root, name);
  await engine().formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name, path: domainPath, maxVolumes: 20 }));
  return domainPath;
}

async function errorOf(p: Promise<unknown>): Promise<SdmeshError | undefined> {
  return p.then(
    () => undefined,
    (e: unknown) => e as SdmeshError,
  );
}

describe('fault points: a SIGKILL at any step leaves a safe, retryable domain', () => {
  let root: string;
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-faults-');
  });
  afterAll(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  const createPoints = FAULT_POINTS.filter((p) => p.startsWith('create.'));

  it.each(['new-image', 'snapshot'] as const)('createVolume (%s) at every create fault point', async (kind) => {
    await Promise.all(
      createPoints.map(async (point) => {
        const domainPath = await newDomain(root, `create-${kind}-${point}`);
        const tx = engine();
        let request = pb.CreateVolumeRequest.fromPartial({
          domainPath,
          imageId: IMAGE,
          volumeId: BASE,
          capacityBytes: 16 * MiB,
          format: pb.VolumeFormat.VOLUME_FORMAT_RAW,
        });
        if (kind === 'snapshot') {
          await tx.createVolume(request);
          request = pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: SNAP, parentId: BASE });
        }
        const child = await runFaultChild('createVolume', request, point);
        expect({ point, signal: child.signal }).toEqual({ point, signal: 'SIGKILL' });

        const listed = (await tx.listVolumes({ domainPath, imageId: '' })).volumes.map((v) => v.id);
        const target = request.volumeId;
        const garbage = await findGarbage(domainPath);
        if (point === 'create.after-commit') {
          expect({ point, listed: listed.includes(target) }).toEqual({ point, listed: true });
        } else {
          // Not committed: no reader sees the volume, and the marker names the dead transaction.
          expect({ point, listed: listed.includes(target) }).toEqual({ point, listed: false });
          const markers = garbage.filter((g) => g.kind === (kind === 'new-image' ? 'uncommitted-image' : 'uncommitted-volume-meta'));
          expect({ point, markers: markers.length }).toEqual({ point, markers: 1 });
          expect(markers[0]!.tx).toMatchObject({ hostId: 7 });
          expect(markers[0]!.needsDomainLease).toBe(true);
        }
        // The same request again succeeds and gives a usable volume.
        const volume = await tx.createVolume(request);
        expect(volume.id).toBe(target);
        const info = await tx.getVolume({ domainPath, imageId: IMAGE, volumeId: target });
        expect(info.qemuInfo?.virtualSize).toBe(16 * MiB);
        expect((await tx.listVolumes({ domainPath, imageId: IMAGE })).volumes.map((v) => v.id)).toEqual(kind === 'snapshot' ? [BASE, SNAP] : [BASE]);
        // A killed transaction's slot stays reserved until the GC collects it: no two volumes share a slot.
        const offsets = (await tx.listVolumes({ domainPath, imageId: '' })).volumes.map((v) => v.lease?.offset);
        expect(new Set(offsets).size).toBe(offsets.length);
      }),
    );
  });

  // Group commit: three creates queued at once share one domain lease hold, pipelined after each
  // one's record is written; the process dies the second time it reaches a create point (so inside
  // a hold, with another create in flight), or between two transactions of the hold.
  it('three creates in one lease hold, killed at the second hit of each create point: each request committed whole or left as a marker; retries succeed', async () => {
    const IMAGES = ['a1b2c3d4-0000-4000-8000-000000000001', 'a1b2c3d4-0000-4000-8000-000000000002', 'a1b2c3d4-0000-4000-8000-000000000003'];
    const VOLUMES = ['b1b2c3d4-0000-4000-8000-000000000001', 'b1b2c3d4-0000-4000-8000-000000000002', 'b1b2c3d4-0000-4000-8000-000000000003'];
    await Promise.all(
      [...createPoints, 'group.next-transaction' as const].map(async (point) => {
        const domainPath = await newDomain(root, `group-${point}`);
        const tx = engine();
        const requests = IMAGES.map((imageId, i) =>
          pb.CreateVolumeRequest.fromPartial({
            domainPath,
            imageId,
            volumeId: VOLUMES[i],
            capacityBytes: 16 * MiB,
            format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
          }),
        );
        const child = await runFaultChildGroup('createVolume', requests, point, point === 'group.next-transaction' ? 1 : 2);
        expect({ point, signal: child.signal }).toEqual({ point, signal: 'SIGKILL' });

        // Which requests got how far is up to the pipeline; what each left is not.
        const listed = (await tx.listVolumes({ domainPath, imageId: '' })).volumes;
        expect({ point, all: listed.length < 3 || point === 'create.after-commit' }).toEqual({ point, all: true });
        for (const v of listed) expect((await tx.getVolume({ domainPath, imageId: v.imageId, volumeId: v.id })).qemuInfo?.virtualSize).toBe(16 * MiB);
        const markers = (await findGarbage(domainPath)).filter((g) => g.kind === 'uncommitted-image');
        for (const m of markers)
          expect({ point, committedImage: listed.some((v) => m.relativePath.includes(v.imageId)) }).toEqual({ point, committedImage: false });
        for (const imageId of IMAGES) expect(markers.filter((m) => m.relativePath.includes(imageId)).length).toBeLessThanOrEqual(1);
        if (point === 'create.after-marker' || point === 'create.after-meta') expect({ point, markers: markers.length > 0 }).toEqual({ point, markers: true });
        // Every request again succeeds; no two volumes share a slot.
        const volumes = await Promise.all(requests.map((r) => tx.createVolume(r)));
        expect(volumes.map((v) => v.id)).toEqual(VOLUMES);
        const offsets = (await tx.listVolumes({ domainPath, imageId: '' })).volumes.map((v) => v.lease?.offset);
        expect(new Set(offsets).size).toBe(3);
      }),
    );
  });

  it('deleteVolume and deleteImage at each delete fault point', async () => {
    await Promise.all(
      (['delete.before-rename', 'delete.after-rename'] as const).flatMap((point) =>
        (['volume', 'image'] as const).map(async (what) => {
          const domainPath = await newDomain(root, `delete-${what}-${point}`);
          const tx = engine();
          await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: BASE, capacityBytes: MiB }));
          await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: SNAP, parentId: BASE }));
          const op = what === 'volume' ? 'deleteVolume' : 'deleteImage';
          const request = { domainPath, imageId: IMAGE, volumeId: SNAP, operationId: 'x' };
          expect((await runFaultChild(op, request, point)).signal).toBe('SIGKILL');
          const listed = (await tx.listVolumes({ domainPath, imageId: '' })).volumes.map((v) => v.id);
          const retry = what === 'volume' ? tx.deleteVolume(request) : tx.deleteImage(request);
          if (point === 'delete.before-rename') {
            expect(listed).toEqual([BASE, SNAP]);
            await retry;
          } else {
            // Committed: gone for readers; a retry reports NOT_FOUND (the caller treats that as done).
            expect(listed).toEqual(what === 'volume' ? [BASE] : []);
            expect((await errorOf(retry))?.code).toBe(GrpcStatus.NOT_FOUND);
            expect((await findGarbage(domainPath)).length).toBeGreaterThan(0);
          }
          expect((await tx.listVolumes({ domainPath, imageId: '' })).volumes.map((v) => v.id)).toEqual(what === 'volume' ? [BASE] : []);
        }),
      ),
    );
  });

  it('updateVolume at each update fault point: the record is old or new, never torn', async () => {
    await Promise.all(
      FAULT_POINTS.filter((p) => p.startsWith('update.')).map(async (point) => {
        const domainPath = await newDomain(root, `update-${point}`);
        const tx = engine();
        await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: BASE, capacityBytes: MiB, initiallyIllegal: true }));
        const request = pb.UpdateVolumeRequest.fromPartial({
          domainPath,
          imageId: IMAGE,
          volumeId: BASE,
          generation: 0,
          legality: pb.Legality.LEGALITY_LEGAL,
          bumpGeneration: true,
        });
        expect((await runFaultChild('updateVolume', request, point)).signal).toBe('SIGKILL');
        const { volume } = await tx.getVolume({ domainPath, imageId: IMAGE, volumeId: BASE });
        if (point === 'update.after-write') {
          expect(volume).toMatchObject({ generation: 1, legality: pb.Legality.LEGALITY_LEGAL });
          expect((await errorOf(tx.updateVolume(request)))?.reason).toBe('GENERATION_MISMATCH');
        } else {
          expect(volume).toMatchObject({ generation: 0, legality: pb.Legality.LEGALITY_ILLEGAL });
          expect(await tx.updateVolume(request)).toMatchObject({ generation: 1, legality: pb.Legality.LEGALITY_LEGAL });
        }
      }),
    );
  });

  it('formatDomain at each format fault point: not a domain until the metadata commit; a retry completes it', async () => {
    await Promise.all(
      FAULT_POINTS.filter((p) => p.startsWith('format.')).map(async (point) => {
        const domainPath = path.join(root, `format-${point}`);
        const request = pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name: 'f', path: domainPath });
        expect((await runFaultChild('formatDomain', request, point)).signal).toBe('SIGKILL');
        const tx = engine();
        const read = await errorOf(tx.getDomain({ path: domainPath }));
        if (point === 'format.after-metadata') expect(read).toBeUndefined();
        else expect(read?.reason).toBe('DOMAIN_NOT_FOUND');
        expect(await tx.formatDomain(request)).toMatchObject({ id: DOMAIN_ID, status: pb.DomainStatus.DOMAIN_STATUS_ACTIVE });
      }),
    );
  });
});
