import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { findGarbage, pb, SdmeshError } from '@sdmesh/common';
import { FAULT_POINTS } from '../../services/metadata-tx/src/faults';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { runFaultChild } from '../harness/metadata-tx-fault-child';

/**
 * FinalizeMerge (the record half of DeleteSnapshot) on real files and qemu-img: a chain
 * base (raw) ← mid ← leaf with data in every layer, the data merge done the way the data-mover
 * does it (qemu-img commit -d / rebase -b '', then the target LEGAL with generation + 1), then
 * the finalize SIGKILLed at each of its fault points (in a child process,
 * runFaultChild): the leaf's guest view is the same at every point, the
 * chain is the old or the new one (plus, after the re-parent, the merged-away volume marked
 * ILLEGAL), and a retry ends it.
 */
jest.setTimeout(120_000);

const DOMAIN_ID = '1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d';
const IMAGE = '2c3d4e5f-6071-4b8c-9d0e-1f2a3b4c5d6e';
const BASE = '3d4e5f60-7182-4c9d-8e1f-2a3b4c5d6e7f';
const MID = '4e5f6071-8293-4dae-9f20-3b4c5d6e7f80';
const LEAF = '5f607182-93a4-4ebf-a031-4c5d6e7f8091';
const MiB = 1024 * 1024;

const engine = () => new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry(), hostId: 1 });
const qemuIo = (file: string, format: string, cmd: string) => execFileSync('qemu-io', ['-f', format, '-c', cmd, file], { stdio: 'ignore' });

/** sha256 of what a guest sees through the chain the records give (formats and backings stated, as sdmesh reads). */
async function guestView(tx: MetadataTransactions, domainPath: string, volumeId: string): Promise<string> {
  const vols = (await tx.listVolumes({ domainPath, imageId: IMAGE })).volumes;
  const layer = (id: string): object => {
    const v = vols.find((x) => x.id === id)!;
    const file = { driver: 'file', filename: v.path };
    return v.format === pb.VolumeFormat.VOLUME_FORMAT_RAW ? { driver: 'raw', file } : { driver: 'qcow2', file, backing: v.parentId ? layer(v.parentId) : null };
  };
  const out = path.join(domainPath, `view-${volumeId}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', `json:${JSON.stringify(layer(volumeId))}`, out]);
  const sum = createHash('sha256')
    .update(await fs.readFile(out))
    .digest('hex');
  await fs.rm(out);
  return sum;
}

/** A domain with base ← mid ← leaf, data in each; returns the leaf's and mid's views. */
async function chain(root: string, name: string): Promise<{ domainPath: string; tx: MetadataTransactions; leafView: string; midView: string }> {
  const domainPath = path.join(root, name);
  const tx = engine();
  await tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name, path: domainPath, maxVolumes: 20 }));
  const base = await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: BASE, capacityBytes: 8 * MiB }));
  qemuIo(base.path, 'raw', 'write -P 0x11 0 4M');
  const mid = await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: MID, parentId: BASE }));
  qemuIo(mid.path, 'qcow2', 'write -P 0x22 2M 4M');
  const leaf = await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: LEAF, parentId: MID }));
  qemuIo(leaf.path, 'qcow2', 'write -P 0x33 5M 1M');
  return { domainPath, tx, leafView: await guestView(tx, domainPath, LEAF), midView: await guestView(tx, domainPath, MID) };
}

/** The data merge as the data-mover's job leaves it: the data in the target, which is LEGAL at generation 1. */
async function mergeData(tx: MetadataTransactions, domainPath: string, mode: 'commit' | 'rebase'): Promise<void> {
  const dir = path.join(domainPath, 'images', IMAGE);
  const mid = {
    driver: 'qcow2',
    file: { driver: 'file', filename: path.join(dir, MID) },
    backing: { driver: 'raw', file: { driver: 'file', filename: path.join(dir, BASE) } },
  };
  if (mode === 'commit') execFileSync('qemu-img', ['commit', '-q', '-d', '-f', 'qcow2', `json:${JSON.stringify(mid)}`]);
  else execFileSync('qemu-img', ['rebase', '-q', '-f', 'qcow2', '-b', '', `json:${JSON.stringify(mid)}`]);
  await tx.updateVolume(
    pb.UpdateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: mode === 'commit' ? BASE : MID, generation: 0, bumpGeneration: true }),
  );
}

const shape = async (tx: MetadataTransactions, domainPath: string) =>
  (await tx.listVolumes({ domainPath, imageId: IMAGE })).volumes.map((v) => [v.id, v.parentId, pb.Legality[v.legality]]);
const backingOf = (file: string) =>
  (JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', '-f', 'qcow2', file], { encoding: 'utf8' })) as { 'backing-filename'?: string })[
    'backing-filename'
  ] ?? '';

describe('FinalizeMerge', () => {
  let root: string;
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-finalize-merge-');
  });
  afterAll(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  const points = [...FAULT_POINTS.filter((p) => p.startsWith('merge.')), 'delete.before-rename', 'delete.after-rename'] as const;

  it.each(points)('killed at %s: the leaf reads the same, the chain is old or new, a retry ends it', async (point) => {
    const { domainPath, tx, leafView, midView } = await chain(root, `kill-${point}`);
    await mergeData(tx, domainPath, 'commit');
    const request = { domainPath, imageId: IMAGE, volumeId: MID, targetId: BASE, targetGeneration: 1, operationId: 'op' };
    expect((await runFaultChild('finalizeMerge', request, point)).signal).toBe('SIGKILL');

    const reparented = point !== 'merge.after-top-illegal' && point !== 'merge.after-rebase';
    const expected =
      point === 'delete.after-rename'
        ? [
            [BASE, '', 'LEGALITY_LEGAL'],
            [LEAF, BASE, 'LEGALITY_LEGAL'],
          ]
        : [
            [BASE, '', 'LEGALITY_LEGAL'],
            [MID, BASE, 'LEGALITY_ILLEGAL'],
            [LEAF, reparented ? BASE : MID, 'LEGALITY_LEGAL'],
          ];
    expect(await shape(tx, domainPath)).toEqual(expected);
    expect(await guestView(tx, domainPath, LEAF)).toBe(leafView);

    await tx.finalizeMerge(pb.FinalizeMergeRequest.fromPartial(request));
    // And once more: already finalized.
    await tx.finalizeMerge(pb.FinalizeMergeRequest.fromPartial(request));
    expect(await shape(tx, domainPath)).toEqual([
      [BASE, '', 'LEGALITY_LEGAL'],
      [LEAF, BASE, 'LEGALITY_LEGAL'],
    ]);
    expect(await guestView(tx, domainPath, LEAF)).toBe(leafView);
    expect(await guestView(tx, domainPath, BASE)).toBe(midView);
    expect(backingOf(path.join(domainPath, 'images', IMAGE, LEAF))).toBe(BASE);
    // The re-parented leaf's header changed: one new generation, however many retries.
    expect((await tx.listVolumes({ domainPath, imageId: IMAGE })).volumes.map((v) => v.generation)).toEqual([1, 1]);
    // The merged-away volume is garbage for the GC (its data renamed too, unless the kill came between the two renames).
    const garbage = (await findGarbage(domainPath)).map((g) => [g.kind, g.volumeId]).sort();
    expect(garbage).toEqual(
      [
        [point === 'delete.after-rename' ? 'orphan-volume-data' : 'deleted-volume-data', MID],
        ['deleted-volume-meta', MID],
      ].sort(),
    );
  });

  it('the base merged into its child (rebase): the child becomes the base, the leaf reads the same', async () => {
    const { domainPath, tx, leafView, midView } = await chain(root, 'rebase');
    await mergeData(tx, domainPath, 'rebase');
    await tx.finalizeMerge(pb.FinalizeMergeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: BASE, targetId: MID, targetGeneration: 1 }));
    expect(await shape(tx, domainPath)).toEqual([
      [MID, '', 'LEGALITY_LEGAL'],
      [LEAF, MID, 'LEGALITY_LEGAL'],
    ]);
    expect(await guestView(tx, domainPath, LEAF)).toBe(leafView);
    expect(await guestView(tx, domainPath, MID)).toBe(midView);
    expect(backingOf(path.join(domainPath, 'images', IMAGE, MID))).toBe('');
    // The child took the data in the merge job (generation 1 then); the finalize moves it no further.
    expect((await tx.listVolumes({ domainPath, imageId: IMAGE })).volumes.map((v) => v.generation)).toEqual([1, 0]);
  });

  it('refusals: the data merge not done, not neighbours, bad ids; nothing changed', async () => {
    const { domainPath, tx } = await chain(root, 'refusals');
    const before = await shape(tx, domainPath);
    const reasonOf = (req: Partial<pb.FinalizeMergeRequest>) =>
      tx.finalizeMerge(pb.FinalizeMergeRequest.fromPartial({ domainPath, imageId: IMAGE, ...req })).then(
        () => 'OK',
        (e: unknown) => (e as SdmeshError).reason,
      );
    expect(await reasonOf({ volumeId: MID, targetId: BASE, targetGeneration: 1 })).toBe('MERGE_INCOMPLETE');
    expect(await reasonOf({ volumeId: BASE, targetId: LEAF, targetGeneration: 0 })).toBe('MERGE_NOT_NEIGHBOURS');
    expect(await reasonOf({ volumeId: LEAF, targetId: BASE, targetGeneration: 0 })).toBe('MERGE_NOT_NEIGHBOURS');
    expect(await reasonOf({ volumeId: MID, targetId: MID, targetGeneration: 0 })).toBe('SAME_VOLUME');
    expect(await reasonOf({ volumeId: '../x', targetId: BASE, targetGeneration: 0 })).toBe('INVALID_ID');
    expect(await reasonOf({ volumeId: MID, targetId: BASE, targetGeneration: -1 })).toBe('INVALID_GENERATION');
    expect(await shape(tx, domainPath)).toEqual(before);
    expect(await findGarbage(domainPath)).toEqual([]);
  });
});
