import { csi, GrpcStatus, SdmeshError } from '@sdmesh/common';
import { leaseModeOf } from '../../services/csi/src/node/attacher';
import { parseVolumeId } from '../../services/csi/src/node/volumes';

const Mode = csi.VolumeCapability_AccessMode_Mode;

describe('CSI node: access modes and volume ids', () => {
  it('maps access modes to the leaf lease and the export', () => {
    expect(leaseModeOf(Mode.SINGLE_NODE_WRITER, 'mount')).toEqual({ shared: false, readOnly: false });
    expect(leaseModeOf(Mode.SINGLE_NODE_MULTI_WRITER, 'block')).toEqual({ shared: false, readOnly: false });
    expect(leaseModeOf(Mode.MULTI_NODE_MULTI_WRITER, 'block')).toEqual({ shared: true, readOnly: false });
    expect(leaseModeOf(Mode.MULTI_NODE_READER_ONLY, 'mount')).toEqual({ shared: true, readOnly: true });
    expect(leaseModeOf(Mode.SINGLE_NODE_READER_ONLY, 'block')).toEqual({ shared: true, readOnly: true });
  });

  it('refuses several writers of a file system and modes it does not support', () => {
    for (const [mode, access] of [
      [Mode.MULTI_NODE_MULTI_WRITER, 'mount'],
      [Mode.MULTI_NODE_SINGLE_WRITER, 'block'],
      [Mode.UNKNOWN, 'block'],
    ] as const) {
      let err: unknown;
      try {
        leaseModeOf(mode, access);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(SdmeshError);
      expect((err as SdmeshError).code).toBe(GrpcStatus.INVALID_ARGUMENT);
    }
  });

  it('parses <domain id>/<disk id>; anything else is NOT_FOUND', () => {
    const d = '0b6f7e64-8f7b-4a53-9a57-3a5f0f2c9a11';
    const i = '5d0c2f64-1a2b-4c3d-8e9f-0a1b2c3d4e5f';
    expect(parseVolumeId(`${d}/${i}`)).toEqual({ domainId: d, imageId: i });
    for (const bad of ['', 'x', `${d}`, `${d}/${i}/x`, `${d}/../${i}`, `${d.toUpperCase()}/${i}`, `${d}/${i} `]) {
      expect(() => parseVolumeId(bad)).toThrow(expect.objectContaining({ code: GrpcStatus.NOT_FOUND }));
    }
  });
});
