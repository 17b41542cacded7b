import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Registry } from 'prom-client';
import { encodeVolumeRecord, GrpcStatus, newVolumeRecord, pb, SdmeshError } from '@sdmesh/common';
import { decodeVolumeRecord, encodeRecord, findGarbage } from '@sdmesh/common/internal';
import { checkDomain } from '@sdmesh/sdmctl';
import { MetadataTransactions } from '../../services/metadata-tx/src/transactions';
import { InProcessDomainLeaseProvider } from '../../services/metadata-tx/src/leases';
import { hashImage } from '../../services/data-mover/src/checksum';
import { openVolumeChain, resolveVolume } from '../../services/data-mover/src/volumes';

const DOMAIN_ID = '6b1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d';
const uuid = (n: number) => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`;
const MiB = 1024 * 1024;

const base = newVolumeRecord({ volumeId: uuid(2), imageId: uuid(1), domainId: DOMAIN_ID, capacityBytes: MiB, ctimeMs: 1, leaseSlot: 3 });

async function codeOf(p: Promise<unknown>): Promise<[string, string, string]> {
  try {
    await p;
    return ['OK', '', ''];
  } catch (err) {
    const e = SdmeshError.from(err);
    return [GrpcStatus[e.code] ?? String(e.code), e.reason, e.message];
  }
}

describe('template and clone records', () => {
  test('a record without the new keys is byte-identical to before; template and clone keys round-trip', () => {
    const plain = encodeVolumeRecord(base);
    expect(plain.toString()).not.toMatch(/TEMPLATE|PARENT_IMAGE_ID/);
    expect(decodeVolumeRecord(plain, 'x')).toEqual(base);
    const template = { ...base, template: true };
    expect(encodeVolumeRecord(template).toString()).toMatch(/\nTEMPLATE=1\n/);
    expect(decodeVolumeRecord(encodeVolumeRecord(template), 'x')).toEqual(template);
    const clone = { ...base, imageId: uuid(5), volumeId: uuid(6), parentId: uuid(2), parentImageId: uuid(1), format: 'QCOW2' as const };
    expect(decodeVolumeRecord(encodeVolumeRecord(clone), 'x')).toEqual(clone);
  });

  test.each([
    ['PARENT_IMAGE_ID without PARENT_ID', [['PARENT_IMAGE_ID', uuid(1)]], ''],
    ['PARENT_IMAGE_ID not a uuid', [['PARENT_IMAGE_ID', '../x']], uuid(9)],
    ['TEMPLATE not 1', [['TEMPLATE', 'yes']], ''],
  ] as const)('%s is CORRUPT_RECORD', (_, extra, parentId) => {
    const fields: Array<readonly [string, string | number]> = [
      ['FORMAT_VERSION', 1],
      ['VOLUME_ID', base.volumeId],
      ['IMAGE_ID', base.imageId],
      ['DOMAIN_ID', DOMAIN_ID],
      ['PARENT_ID', parentId],
      ['FORMAT', 'RAW'],
      ['ALLOCATION', 'SPARSE'],
      ['CAPACITY', MiB],
      ['LEGALITY', 'LEGAL'],
      ['GENERATION', 0],
      ['CTIME_MS', 1],
      ['DESCRIPTION', ''],
      ['LEASE_SLOT', 3],
      ...extra,
    ];
    const err = (() => {
      try {
        decodeVolumeRecord(encodeRecord('sdmesh-volume', fields), 'x');
      } catch (e) {
        return e as SdmeshError;
      }
      return undefined;
    })();
    expect([err?.code, err?.reason]).toEqual([GrpcStatus.DATA_LOSS, 'CORRUPT_RECORD']);
  });
});

describe('templates and thin clones in metadata-tx, the data-mover and sdmctl check (real files, qemu-img)', () => {
  let root: string;
  let domainPath: string;
  let tx: MetadataTransactions;
  const T = uuid(1); // template image
  const TV = uuid(2);
  const op = 'unit';

  beforeEach(async () => {
    root = await fs.mkdtemp('/var/tmp/sdmesh-tmpl-');
    domainPath = path.join(root, 'domain');
    tx = new MetadataTransactions({ leases: new InProcessDomainLeaseProvider(), registry: new Registry(), hostId: 1 });
    await tx.formatDomain(pb.FormatDomainRequest.fromPartial({ domainId: DOMAIN_ID, name: 'tmpl', path: domainPath, maxVolumes: 20 }));
    await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: T, volumeId: TV, capacityBytes: 4 * MiB, operationId: op }));
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 2M', path.join(domainPath, 'images', T, TV)], { stdio: 'ignore' });
  });
  afterEach(async () => {
    await fs.rm(root, { recursive: true, force: true });
  });

  const clone = (imageId: string, volumeId: string, extra: Partial<pb.CreateVolumeRequest> = {}) =>
    tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId, volumeId, parentId: TV, parentImageId: T, operationId: op, ...extra }));

  test('mark, clone, read through the clone, refuse deleting the template until its clone is gone', async () => {
    expect(await codeOf(clone(uuid(3), uuid(4)))).toEqual(['FAILED_PRECONDITION', 'NOT_A_TEMPLATE', expect.any(String)]);
    const marked = await tx.markTemplate({ domainPath, imageId: T, operationId: op });
    expect(marked.template).toBe(true);
    expect((await tx.markTemplate({ domainPath, imageId: T, operationId: op })).generation).toBe(marked.generation); // a retry changes nothing

    const c = await clone(uuid(3), uuid(4));
    expect([c.parentId, c.parentImageId, c.format, c.allocation, c.capacityBytes]).toEqual([
      TV,
      T,
      pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
      pb.VolumeAllocation.VOLUME_ALLOCATION_SPARSE,
      4 * MiB,
    ]);
    expect((await clone(uuid(3), uuid(4))).id).toBe(c.id); // a retry returns the committed clone
    expect((await codeOf(clone(uuid(3), uuid(5))))[1]).toBe('IMAGE_EXISTS');

    // The data-mover builds the chain from the records, into the template's image.
    const resolved = await resolveVolume('clone', { domainPath, imageId: uuid(3), volumeId: uuid(4) });
    expect(resolved.ancestors.map((r) => [r.imageId, r.volumeId, r.template])).toEqual([[T, TV, true]]);
    // A hostile header naming another backing file changes nothing: the chain comes from the records.
    const cloneFile = path.join(domainPath, 'images', uuid(3), uuid(4));
    execFileSync('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', '/etc/hostname', '-F', 'raw', cloneFile]);
    execFileSync(
      'qemu-io',
      ['-c', 'write -P 9 3M 1M', `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: cloneFile }, backing: null })}`],
      {
        stdio: 'ignore',
      },
    );
    const chain = await openVolumeChain(resolved);
    try {
      expect(chain.formats).toEqual(['QCOW2', 'RAW']);
      const expected = Buffer.alloc(4 * MiB);
      expected.fill(7, 0, 2 * MiB);
      expected.fill(9, 3 * MiB, 4 * MiB);
      expect((await hashImage(chain)).checksum).toBe(createHash('sha256').update(expected).digest('hex'));
    } finally {
      await chain.close();
    }

    // A snapshot of the clone: its chain runs through the clone's base into the template.
    await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: uuid(3), volumeId: uuid(15), parentId: uuid(4), operationId: op }));
    const top = await resolveVolume('snapshot', { domainPath, imageId: uuid(3), volumeId: uuid(15) });
    expect(top.ancestors.map((r) => r.volumeId)).toEqual([uuid(4), TV]);
    expect((await checkDomain(domainPath)).violations).toEqual([]);

    // Refused on storage: snapshot of the template, deleting it (image or volume) while a clone uses it.
    expect(
      (await codeOf(tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: T, volumeId: uuid(9), parentId: TV, operationId: op }))))[1],
    ).toBe('DISK_IS_TEMPLATE');
    const refused = await codeOf(tx.deleteImage({ domainPath, imageId: T, operationId: op }));
    expect(refused.slice(0, 2)).toEqual(['FAILED_PRECONDITION', 'TEMPLATE_HAS_CLONES']);
    expect(refused[2]).toMatch(/1 thin clone/);
    expect((await codeOf(tx.deleteVolume({ domainPath, imageId: T, volumeId: TV, operationId: op })))[1]).toBe('TEMPLATE_HAS_CLONES');

    // sdmctl check: a cross-image parent that is a template is fine; the GC sees no garbage.
    const report = await checkDomain(domainPath);
    expect(report.violations).toEqual([]);
    expect(await findGarbage(domainPath)).toEqual([]);

    await tx.deleteImage({ domainPath, imageId: uuid(3), operationId: op });
    expect((await findGarbage(domainPath)).map((g) => g.kind)).toEqual(['deleted-image']);
    await tx.deleteImage({ domainPath, imageId: T, operationId: op });
  });

  test('what can not be a template or a clone source', async () => {
    // A chain.
    await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: T, volumeId: uuid(7), parentId: TV, operationId: op }));
    expect((await codeOf(tx.markTemplate({ domainPath, imageId: T, operationId: op })))[1]).toBe('TEMPLATE_NOT_SINGLE_VOLUME');
    // An ILLEGAL volume.
    await tx.createVolume(
      pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: uuid(10), volumeId: uuid(11), capacityBytes: MiB, initiallyIllegal: true }),
    );
    expect((await codeOf(tx.markTemplate({ domainPath, imageId: uuid(10), operationId: op })))[1]).toBe('DISK_ILLEGAL');
    // Unknown images, a clone of itself, a clone naming no parent volume.
    expect((await codeOf(tx.markTemplate({ domainPath, imageId: uuid(12), operationId: op })))[1]).toBe('IMAGE_NOT_FOUND');
    expect((await codeOf(clone(uuid(13), uuid(14), { parentImageId: uuid(12) })))[1]).toBe('PARENT_NOT_FOUND');
    expect((await codeOf(clone(T, uuid(14))))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(clone(uuid(13), uuid(14), { parentId: '' })))[0]).toBe('INVALID_ARGUMENT');
    expect((await codeOf(clone(uuid(13), uuid(14), { parentImageId: '../x' })))[0]).toBe('INVALID_ARGUMENT');
    expect(await fs.readdir(path.join(domainPath, 'images'))).toEqual([T, uuid(10)].sort());
  });

  test('sdmctl check flags a cross-image parent that is not a template', async () => {
    const T2 = uuid(20);
    await tx.createVolume(pb.CreateVolumeRequest.fromPartial({ domainPath, imageId: T2, volumeId: uuid(21), capacityBytes: MiB }));
    await tx.markTemplate({ domainPath, imageId: T, operationId: op });
    await clone(uuid(3), uuid(4));
    // Hand-edit the clone's record to name the other (not template) image: check reports it, the data-mover refuses the chain.
    const meta = path.join(domainPath, 'images', uuid(3), `${uuid(4)}.meta`);
    const record = decodeVolumeRecord(await fs.readFile(meta), meta);
    await fs.writeFile(meta, encodeVolumeRecord({ ...record, parentImageId: T2, parentId: uuid(21) }));
    const report = await checkDomain(domainPath);
    expect(report.violations.map((f) => f.check)).toEqual(['template-parent']);
    expect((await codeOf(resolveVolume('clone', { domainPath, imageId: uuid(3), volumeId: uuid(4) })))[1]).toBe('BROKEN_CHAIN');
  });
});
