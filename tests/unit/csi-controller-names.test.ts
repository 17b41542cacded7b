import { csi, pb, SdmeshError } from '@sdmesh/common';
import { accessPolicy, checkCapabilities, unsupported } from '../../services/csi/src/controller/capabilities';
import { CsiController, DEFAULT_VOLUME_BYTES, parseParameters, sizeFor } from '../../services/csi/src/controller/index';
import type { SchedulerApi } from '../../services/csi/src/controller/scheduler-api';
import { MAX_VOLUMES_PER_NODE } from '../../services/csi/src/node';
import {
  checkCsiName,
  decodeToken,
  encodeToken,
  formatId,
  nameHash,
  parseId,
  parseLabel,
  requestHash,
  requestIdFor,
  snapshotLabel,
  volumeLabel,
} from '../../services/csi/src/controller/names';
import { csiSocketPath } from '../../services/csi/src/endpoint';
import { domainTopologyKey, topologyDomains } from '../../services/csi/src/plugin';

const Mode = csi.VolumeCapability_AccessMode_Mode;
const D = '0b4c3e2a-1111-4222-8333-444455556666';
const K = '7f00aa11-2222-4333-8444-555566667777';
const codeOf = (fn: () => unknown) => {
  try {
    fn();
    return 'OK';
  } catch (err) {
    return (err as SdmeshError).code;
  }
};

describe('CSI controller: names, ids, labels', () => {
  it('takes names of up to 128 bytes of anything, refuses empty and longer ones', () => {
    expect(checkCsiName('x'.repeat(128))).toHaveLength(128);
    expect(checkCsiName('ä'.repeat(64))).toBe('ä'.repeat(64));
    expect(codeOf(() => checkCsiName('x'.repeat(129)))).toBe(3);
    expect(codeOf(() => checkCsiName('ä'.repeat(65)))).toBe(3);
    expect(codeOf(() => checkCsiName(''))).toBe(3);
  });

  it('maps a name to request ids the scheduler accepts, one per incarnation, the same every time', () => {
    const name = 'pvc/ä b\n' + 'z'.repeat(100);
    const ids = [1, 2, 1000].map((n) => requestIdFor('volume', name, n));
    for (const id of ids) expect(id).toMatch(/^[A-Za-z0-9._:-]{1,128}$/);
    expect(new Set(ids).size).toBe(3);
    expect(requestIdFor('volume', name, 1)).toBe(ids[0]);
    expect(requestIdFor('snapshot', name, 1)).not.toBe(ids[0]);
    expect(nameHash('a')).not.toBe(nameHash('b'));
  });

  it('labels disks in 256 bytes of printable text and reads the labels back', () => {
    const name = 'n\u0001' + 'ä'.repeat(63);
    const v = volumeLabel(name, requestHash({ b: 2, a: 1 }));
    expect(Buffer.byteLength(v)).toBeLessThanOrEqual(256);
    expect(v).not.toMatch(/[\u0000-\u001f]/); // eslint-disable-line no-control-regex
    expect(parseLabel(v)).toEqual({ kind: 'csi-volume', nameHash: nameHash(name), requestHash: requestHash({ a: 1, b: 2 }) });
    expect(parseLabel(snapshotLabel(name, K))).toEqual({ kind: 'csi-snapshot', nameHash: nameHash(name), sourceDiskId: K });
    expect(Buffer.byteLength(snapshotLabel('x'.repeat(128), K))).toBeLessThanOrEqual(256);
    for (const other of ['', 'my disk', 'csi-volume short 0123456789abcdef', `csi-snapshot ${nameHash('a')} not-a-uuid`])
      expect(parseLabel(other)).toBeUndefined();
  });

  it('formats and parses volume ids, and nothing else parses', () => {
    expect(parseId(formatId({ domainId: D, diskId: K }))).toEqual({ domainId: D, diskId: K });
    for (const bad of ['', D, `${D}/${K}/x`, `${D}/nope`, 'fake-volume-id']) expect(parseId(bad)).toBeUndefined();
  });

  it('round-trips list tokens and refuses foreign ones', () => {
    expect(decodeToken(encodeToken({ domainId: D, pageToken: 'abc' }))).toEqual({ domainId: D, pageToken: 'abc' });
    for (const bad of ['garbage', Buffer.from('[1,2]').toString('base64url'), Buffer.from(JSON.stringify(['x', ''])).toString('base64url')])
      expect(decodeToken(bad)).toBeUndefined();
  });

  it('sizes volumes from capacity ranges', () => {
    const r = (requiredBytes: number, limitBytes = 0) => ({ requiredBytes, limitBytes });
    expect(sizeFor(undefined)).toBe(DEFAULT_VOLUME_BYTES);
    expect(sizeFor(r(1000))).toBe(1024);
    expect(sizeFor(r(0, 100 * 1024))).toBe(100 * 1024);
    expect(sizeFor(r(0), 5 * 1024 * 1024)).toBe(5 * 1024 * 1024);
    expect(sizeFor(r(1024), 4096)).toBe(4096);
    expect(codeOf(() => sizeFor(r(2048, 1024)))).toBe(11);
    expect(codeOf(() => sizeFor(r(0, 1024), 4096))).toBe(11);
    expect(codeOf(() => sizeFor(r(1000, 1000)))).toBe(11); // 1024 does not fit under the limit
    expect(codeOf(() => sizeFor(r(-1)))).toBe(3);
    expect(codeOf(() => sizeFor(r(65 * 1024 ** 4)))).toBe(11);
  });

  it('reads StorageClass parameters, ignoring the provisioner metadata', () => {
    expect(parseParameters({ domain: D, format: 'qcow2', allocation: 'preallocated', 'csi.storage.k8s.io/pv/name': 'pv-1' })).toEqual({
      domain: D,
      format: pb.VolumeFormat.VOLUME_FORMAT_QCOW2,
      allocation: pb.VolumeAllocation.VOLUME_ALLOCATION_PREALLOCATED,
    });
    for (const bad of [{ format: 'vmdk' }, { allocation: 'thick' }, { colour: 'blue' }] as Array<Record<string, string>>)
      expect(codeOf(() => parseParameters(bad))).toBe(3);
  });

  it('supports single-node modes, readers, and several writers on raw block only', () => {
    const cap = (mode: number, blockDevice: boolean, fsType = 'ext4'): csi.VolumeCapability => ({
      accessType: blockDevice ? { $case: 'block', block: {} } : { $case: 'mount', mount: { fsType, mountFlags: [], volumeMountGroup: '' } },
      accessMode: { mode },
    });
    expect(unsupported(cap(Mode.SINGLE_NODE_WRITER, false))).toBeUndefined();
    expect(unsupported(cap(Mode.MULTI_NODE_MULTI_WRITER, true))).toBeUndefined();
    expect(unsupported(cap(Mode.MULTI_NODE_MULTI_WRITER, false))).toMatch(/raw block/);
    expect(unsupported(cap(Mode.MULTI_NODE_SINGLE_WRITER, true))).toBeDefined();
    expect(unsupported(cap(Mode.SINGLE_NODE_WRITER, false, 'btrfs'))).toMatch(/btrfs/);
    expect(unsupported(cap(Mode.UNKNOWN, true))).toBeDefined();
    expect(codeOf(() => checkCapabilities([]))).toBe(3);
    expect(accessPolicy(cap(Mode.MULTI_NODE_READER_ONLY, false), false)).toEqual({ mode: pb.AttachmentMode.ATTACHMENT_MODE_SHARED, readonly: true });
    expect(accessPolicy(cap(Mode.SINGLE_NODE_WRITER, true), true)).toEqual({ mode: pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE, readonly: true });
    expect(accessPolicy(cap(Mode.MULTI_NODE_MULTI_WRITER, true), false)).toEqual({ mode: pb.AttachmentMode.ATTACHMENT_MODE_SHARED, readonly: false });
  });

  it('names a domain as a topology segment', () => {
    const segments = { [domainTopologyKey(D)]: 'true', [domainTopologyKey(K)]: 'false', 'kubernetes.io/hostname': 'n1' };
    expect(topologyDomains(segments)).toEqual([D]);
  });

  it('serves unix socket endpoints only', () => {
    expect(csiSocketPath('unix:///csi/csi.sock')).toBe('/csi/csi.sock');
    expect(csiSocketPath('/run/x.sock')).toBe('/run/x.sock');
    for (const bad of ['tcp://127.0.0.1:10000', 'unix://relative.sock', `unix:///${'x'.repeat(120)}`]) expect(() => csiSocketPath(bad)).toThrow();
  });
});

describe('CSI controller: the node attach limit', () => {
  it('refuses a publish past max_volumes_per_node (RESOURCE_EXHAUSTED), not the same volume again', async () => {
    const onNode = Array.from({ length: MAX_VOLUMES_PER_NODE }, (_, i) => ({ diskId: i === 0 ? K : `other-${i}`, host: 'n1' }));
    const published: string[] = [];
    const api = {
      disks: { getDisk: async (req: { diskId: string }) => ({ id: req.diskId, storageDomainId: D, template: false, legality: pb.Legality.LEGALITY_LEGAL }) },
      attachments: {
        listDiskAttachments: async () => ({ attachments: onNode }),
        publishDisk: async (req: { diskId: string; host: string }) => {
          published.push(req.diskId);
          return {
            storageDomainId: D,
            diskId: req.diskId,
            host: req.host,
            mode: pb.AttachmentMode.ATTACHMENT_MODE_EXCLUSIVE,
            leafVolumeId: 'l',
            generation: 1,
          };
        },
      },
    } as unknown as SchedulerApi;
    const c = new CsiController(api);
    const cap: csi.VolumeCapability = { accessType: { $case: 'block', block: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } };
    const publish = (diskId: string) =>
      c.controllerPublishVolume(
        { volumeId: formatId({ domainId: D, diskId }), nodeId: 'n1', volumeCapability: cap, readonly: false, secrets: {}, volumeContext: {} },
        {},
      );
    const NEW = '11111111-2222-4333-8444-555566667777';
    await expect(publish(NEW)).rejects.toMatchObject({ code: 8 });
    await expect(publish(K)).resolves.toMatchObject({ publishContext: { generation: '1', access: 'exclusive' } });
    expect(published).toEqual([K]);
  });
});
