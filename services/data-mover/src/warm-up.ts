import { randomUUID } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  DomainLayout,
  encodeDomainMetadata,
  encodeVolumeRecord,
  newVolumeRecord,
  FIRST_CHILD_FD,
  FIRST_VOLUME_SLOT,
  LEASE_SLOT_SIZE,
  newTxId,
  readVolumeRecord,
  TX_INFIX,
  volumeDataName,
  volumeMetaName,
  type VolumeRecord,
} from '@sdmesh/common/worker';
import { startQemuImgWithProgress } from './qemu';
import { checkCopy, openVolumeChain, resolveVolume } from './volumes';

/**
 * A warm worker's rehearsal of a copy job's storage steps, on a scratch domain of its own (a
 * temporary directory: domain metadata and two small raw volumes), run while it waits for its
 * job: both volumes read and checked, their files opened as the copy opens them (the destination
 * O_DIRECT), a record read and replaced (without fsync), a qemu-img started (for its version). A
 * worker runs one job and exits, so without this every function on a job's path would run for the
 * first time inside the job, compiled
 * lazily and with cold caches (measured: a process's first resolve of a volume took 5–10 ms, the
 * next ones ≈ 1 ms). It touches no shared storage and takes no lease; the directory is removed.
 * Failures are only reported (a job works without the rehearsal, a little slower). Once `jobCame`
 * says so, the steps left are skipped: the job runs them itself, in this process, and the
 * rehearsal would only compete with it.
 */
export async function rehearseCopySteps(hostId: number, scratchDir = os.tmpdir(), jobCame: () => boolean = () => false): Promise<void> {
  const root = await fs.mkdtemp(path.join(scratchDir, 'sdmesh-worker-rehearsal-'));
  try {
    const layout = new DomainLayout(root);
    const domainId = randomUUID();
    await fs.mkdir(path.dirname(layout.metadataPath), { recursive: true });
    await fs.writeFile(
      layout.metadataPath,
      encodeDomainMetadata({
        domainId,
        name: 'rehearsal',
        ctimeMs: Date.now(),
        maxVolumes: 2,
        ioTimeoutSeconds: 1,
        leaseSlotSize: LEASE_SLOT_SIZE,
        firstVolumeSlot: FIRST_VOLUME_SLOT,
      }),
    );
    const volume = async (slot: number, legality: VolumeRecord['legality']) => {
      const imageId = randomUUID();
      const volumeId = randomUUID();
      const imageDir = path.join(layout.imagesDir, imageId);
      await fs.mkdir(imageDir, { recursive: true });
      const record = newVolumeRecord({ volumeId, imageId, domainId, capacityBytes: 1024 * 1024, legality, leaseSlot: slot });
      await fs.writeFile(path.join(imageDir, volumeMetaName(volumeId)), encodeVolumeRecord(record));
      await fs.writeFile(path.join(imageDir, volumeDataName(volumeId)), '');
      await fs.truncate(path.join(imageDir, volumeDataName(volumeId)), record.capacityBytes);
      return { domainPath: root, imageId, volumeId };
    };
    const refs = await Promise.all([volume(FIRST_VOLUME_SLOT, 'LEGAL'), volume(FIRST_VOLUME_SLOT + 1, 'ILLEGAL')]);
    if (jobCame()) return;
    const [source, destination] = await Promise.all(refs.map((ref, i) => resolveVolume(i ? 'destination' : 'source', ref)));
    checkCopy(source!, destination!, { collapse: true, destinationGeneration: 0 });
    if (jobCame()) return;
    const chains = await Promise.all([openVolumeChain(source!, { readDirect: true }), openVolumeChain(destination!, { write: true })]);
    chains[0].spec(FIRST_CHILD_FD);
    chains[1].spec(FIRST_CHILD_FD + 1);
    await Promise.all(chains.map((c) => c.close()));
    if (jobCame()) return;
    const dst = destination!;
    const record = await readVolumeRecord(dst.metaPath, { volumeId: dst.volumeId, imageId: dst.imageId, domainId });
    // The record write up to its fsyncs (not them: an fsync commits the file system's journal,
    // which could stall a copy running meanwhile): the temp file's name, creation and content.
    const temp = dst.metaPath + TX_INFIX + newTxId(hostId);
    await fs.writeFile(temp, encodeVolumeRecord({ ...record, legality: 'LEGAL', generation: 1 }));
    await fs.rename(temp, dst.metaPath);
    // A process's first child start is the slow one (the job's convert spawn took 10 ms, measured;
    // a node process's first spawn costs 2–4 ms more than the next): qemu-img started the way the
    // convert is (setpriv, own group, progress pipes), for its version only.
    if (jobCame()) return;
    await startQemuImgWithProgress(['--version'], () => undefined).done;
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
}
