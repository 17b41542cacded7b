import { pb, type ServiceHandlers } from '@sdmesh/common';
import type { MetadataTransactions } from './transactions';

/** gRPC handlers of MetadataTxService: thin wrappers; the engine validates and throws SdmeshError. */
export function metadataTxHandlers(tx: MetadataTransactions): ServiceHandlers<typeof pb.MetadataTxServiceDefinition> {
  return {
    formatDomain: (req) => tx.formatDomain(req),
    getDomain: (req) => tx.getDomain(req),
    createVolume: (req, ctx) => tx.createVolume(req, ctx.signal),
    deleteVolume: (req, ctx) => tx.deleteVolume(req, ctx.signal),
    deleteImage: (req, ctx) => tx.deleteImage(req, ctx.signal),
    updateVolume: (req, ctx) => tx.updateVolume(req, ctx.signal),
    listImages: (req) => tx.listImages(req),
    listVolumes: (req) => tx.listVolumes(req),
    getVolume: (req, ctx) => tx.getVolume(req, ctx.signal),
  };
}
