import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { ConfinedRoot, encodeVolumeRecord, pb, readVolumeRecord, SdmeshError, TX_INFIX } from '@sdmesh/common';
import { checkMerge, mergeData } from '../../services/data-mover/src/merge';
import { resolveVolume } from '../../services/data-mover/src/volumes';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';

/**
 * The data step of a merge (services/data-mover/src/merge.ts) on real files and qemu-img: a
 * parent smaller than the volume committed into it is grown first (raw preallocated: falloc;
 * qcow2: qemu-img resize), and then holds exactly the view the volume had; the checks that
 * refuse a merge before any lease or write.
 */
jest.setTimeout(120_000);

const DOMAIN_ID = '0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d';
const IMAGE = '1b2c3d4e-5f60-4b7c-8d9e-9f0a1b2c3d4e';
const OTHER_IMAGE = '2c3d4e5f-6071-4c8d-9e0f-0a1b2c3d4e5f';
const BASE = '3d4e5f60-7182-4d9e-8f01-1b2c3d4e5f60';
const TOP = '4e5f6071-8293-4eaf-9012-2c3d4e5f6071';
const MiB = 1024 * 1024;

const qemuIo = (file: string, format: string, cmd: string) => execFileSync('qemu-io', ['-f', format, '-c', cmd, file], { stdio: 'ignore' });
const ref = (domainPath: string, volumeId: string, imageId = IMAGE): pb.VolumeRef => ({ domainPath, imageId, volumeId });

/** sha256 of a guest view: a json: chain of (path, format) layers, top first, read as raw. */
function viewOf(layers: Array<[string, 'raw' | 'qcow2']>): string {
  const spec = (i: number): object => {
    const [filename, driver] = layers[i]!;
    return driver === 'raw'
      ? { driver, file: { driver: 'file', filename } }
      : { driver, file: { driver: 'file', filename }, backing: i + 1 < layers.length ? spec(i + 1) : null };
  };
  const out = `${layers[0]![0]}.view-${process.pid}`;
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', `json:${JSON.stringify(spec(0))}`, out]);
  try {
    return createHash('sha256').update(readFileSync(out)).digest('hex');
  } finally {
    rmSync(out);
  }
}

describe('data-mover merge: the data step', () => {
  let root: string;
  beforeAll(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-merge-data-');
  });
  afterAll(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  /** base (8 MiB) ← top, the top grown to 16 MiB (as an extended disk's leaf is), data in both. */
  async function grownTop(name: string, base: Partial<pb.CreateVolumeRequest>) {
    const domainPath = path.join(root, name);
    const tx = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry(), hostId: 1 });
    await tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name, path: domainPath, maxVolumes: 20 }));
    const b = await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: BASE, capacityBytes: 8 * MiB, ...base }));
    const baseFormat = b.format === pb.VolumeFormat.VOLUME_FORMAT_RAW ? 'raw' : 'qcow2';
    qemuIo(b.path, baseFormat, 'write -P 0x11 0 6M');
    const t = await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: IMAGE, volumeId: TOP, parentId: BASE }));
    execFileSync('qemu-img', ['resize', '-q', '-f', 'qcow2', t.path, '16M']);
    const meta = `${t.path}.meta`;
    const record = await readVolumeRecord(meta, { volumeId: TOP, imageId: IMAGE, domainId: DOMAIN_ID });
    await new ConfinedRoot(domainPath).writeFileAtomic(meta, encodeVolumeRecord({ ...record, capacityBytes: 16 * MiB }), { tempSuffix: `${TX_INFIX}test` });
    qemuIo(t.path, 'qcow2', 'write -P 0x22 4M 2M');
    qemuIo(t.path, 'qcow2', 'write -P 0x33 12M 2M');
    const topView = viewOf([
      [t.path, 'qcow2'],
      [b.path, baseFormat],
    ]);
    return { domainPath, tx, base: b, baseFormat, top: t, topView } as const;
  }

  it.each([
    ['raw preallocated', { format: pb.VolumeFormat.VOLUME_FORMAT_RAW, allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED }],
    ['qcow2', { format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2 }],
  ] as const)('a %s parent smaller than its child grows to the child and then shows its view', async (name, base) => {
    const c = await grownTop(name.replace(' ', '-'), base);
    const plan = checkMerge(await resolveVolume('source', ref(c.domainPath, TOP)), await resolveVolume('destination', ref(c.domainPath, BASE)), {
      destinationGeneration: 0,
    });
    expect({ mode: plan.mode, capacityBytes: plan.capacityBytes }).toEqual({ mode: 'commit', capacityBytes: 16 * MiB });
    const seen: number[] = [];
    await mergeData(plan, { signal: new AbortController().signal, rateLimitBytesPerSecond: 0, onPercent: (p) => seen.push(p) });
    expect(seen.at(-1)).toBe(100);
    expect(viewOf([[c.base.path, c.baseFormat]])).toBe(c.topView);
    if (c.baseFormat === 'raw') expect((await fs.stat(c.base.path)).blocks * 512).toBeGreaterThanOrEqual(16 * MiB);
  });

  it('refuses before anything is written: not neighbours, an ILLEGAL source, another generation', async () => {
    const c = await grownTop('refusals', { format: pb.VolumeFormat.VOLUME_FORMAT_RAW });
    await c.tx.createVolume(
      pb.CreateVolumeRequest.fromPartial({ domainPath: c.domainPath, imageId: OTHER_IMAGE, volumeId: BASE.replace('3d4e', '5e6f'), capacityBytes: 16 * MiB }),
    );
    const top = await resolveVolume('source', ref(c.domainPath, TOP));
    const base = await resolveVolume('destination', ref(c.domainPath, BASE));
    const other = await resolveVolume('destination', ref(c.domainPath, BASE.replace('3d4e', '5e6f'), OTHER_IMAGE));
    const reasonOf = (f: () => unknown) => {
      try {
        f();
        return 'OK';
      } catch (err) {
        return (err as SdmeshError).reason;
      }
    };
    expect(reasonOf(() => checkMerge(top, other, { destinationGeneration: 0 }))).toBe('MERGE_NOT_NEIGHBOURS');
    expect(reasonOf(() => checkMerge(base, top, { destinationGeneration: 0 }))).toBe('OK'); // the base into its only child
    expect(reasonOf(() => checkMerge(top, base, { destinationGeneration: 3 }))).toBe('GENERATION_MISMATCH');
    expect(reasonOf(() => checkMerge({ ...top, record: { ...top.record, legality: 'ILLEGAL' } }, base, { destinationGeneration: 0 }))).toBe('SOURCE_ILLEGAL');
    expect(viewOf([[c.base.path, 'raw']])).not.toBe(c.topView);
  });
});
