import { failedPrecondition, pb, readDomainMetadata, type DomainLeases, type ServiceHandlers, type StorageRoots } from '@sdmesh/common';
import type { MetadataTransactions } from './transactions';

/**
 * gRPC handlers of MetadataTxService: thin wrappers; the engine validates and throws SdmeshError.
 * `spm` is this process's lease access for SPM mode (absent in single-process mode).
 * Every request names a domain beneath one of the host's storage roots; a new domain
 * (FormatDomain) is also checked on the storage: not inside another domain, not above one.
 */
export function metadataTxHandlers(tx: MetadataTransactions, roots: StorageRoots, spm?: DomainLeases): ServiceHandlers<typeof pb.MetadataTxServiceDefinition> {
  const spmHeld = new Map<string, number>();
  const under = <R extends { domainPath: string }>(req: R): R => ({ ...req, domainPath: roots.requireUnder(req.domainPath) });
  return {
    formatDomain: async (req) => tx.formatDomain({ ...req, path: await roots.checkNewDomainOnStorage(req.path) }),
    getDomain: (req) => tx.getDomain({ ...req, path: roots.requireUnder(req.path) }),
    createVolume: (req, ctx) => tx.createVolume(under(req), ctx.signal),
    deleteVolume: (req, ctx) => tx.deleteVolume(under(req), ctx.signal),
    deleteImage: (req, ctx) => tx.deleteImage(under(req), ctx.signal),
    updateVolume: (req, ctx) => tx.updateVolume(under(req), ctx.signal),
    listImages: (req) => tx.listImages(under(req)),
    listVolumes: (req) => tx.listVolumes(under(req)),
    getVolume: (req, ctx) => tx.getVolume(under(req), ctx.signal),
    async acquireSpmLease(req, ctx) {
      if (!spm) throw failedPrecondition('this metadata-tx runs without a lease-manager and cannot hold the SPM lease', 'NO_LEASE_MANAGER');
      const root = roots.requireUnder(req.domainPath);
      const md = await readDomainMetadata(root);
      const held = spmHeld.get(md.domainId);
      if (held !== undefined) return { lver: held }; // already ours: a retry
      const lease = await spm.holdSpmLease({ id: md.domainId, path: root }, { deadline: ctx.deadline, signal: ctx.signal });
      spmHeld.set(md.domainId, lease.lver);
      return { lver: lease.lver };
    },
  };
}
