import { pb, type ServiceHandlers, type StorageRoots } from '@sdmesh/common';
import type { MetadataTransactions, SpmLeases } from './transactions';

/**
 * gRPC handlers of MetadataTxService: they only route (the transaction kinds validate and
 * throw SdmeshError). Every request names a domain beneath one of the host's storage roots;
 * a new domain (FormatDomain) is also checked on the storage: not inside another domain, not
 * above one.
 */
export function metadataTxHandlers(tx: MetadataTransactions, roots: StorageRoots, spm: SpmLeases): ServiceHandlers<typeof pb.MetadataTxServiceDefinition> {
  const under = <R extends { domainPath: string }>(req: R): R => ({ ...req, domainPath: roots.requireUnder(req.domainPath) });
  return {
    formatDomain: async (req) => tx.formatDomain({ ...req, path: await roots.checkNewDomainOnStorage(req.path) }),
    getDomain: (req) => tx.getDomain({ ...req, path: roots.requireUnder(req.path) }),
    createVolume: (req, ctx) => tx.createVolume(under(req), ctx.signal),
    deleteVolume: (req, ctx) => tx.deleteVolume(under(req), ctx.signal),
    deleteImage: (req, ctx) => tx.deleteImage(under(req), ctx.signal),
    updateVolume: (req, ctx) => tx.updateVolume(under(req), ctx.signal),
    finalizeMerge: (req, ctx) => tx.finalizeMerge(under(req), ctx.signal),
    markTemplate: (req, ctx) => tx.markTemplate(under(req), ctx.signal),
    fenceOperation: (req, ctx) => tx.fenceOperation(under(req), ctx.signal),
    listImages: (req) => tx.listImages(under(req)),
    listVolumes: (req) => tx.listVolumes(under(req)),
    getVolume: (req, ctx) => tx.getVolume(under(req), ctx.signal),
    acquireSpmLease: (req, ctx) => spm.acquire(roots.requireUnder(req.domainPath), { deadline: ctx.deadline, signal: ctx.signal }),
  };
}
