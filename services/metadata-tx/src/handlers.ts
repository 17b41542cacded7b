import { failedPrecondition, pb, readDomainMetadata, validateDomainPath, type DomainLeases, type ServiceHandlers } from '@sdmesh/common';
import type { MetadataTransactions } from './transactions';

/**
 * gRPC handlers of MetadataTxService: thin wrappers; the engine validates and throws SdmeshError.
 * `spm` is this process's lease access for SPM mode (absent in single-process mode).
 */
export function metadataTxHandlers(tx: MetadataTransactions, spm?: DomainLeases): ServiceHandlers<typeof pb.MetadataTxServiceDefinition> {
  const spmHeld = new Map<string, number>();
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
    async acquireSpmLease(req, ctx) {
      if (!spm) throw failedPrecondition('this metadata-tx runs without a lease-manager and cannot hold the SPM lease', 'NO_LEASE_MANAGER');
      const root = validateDomainPath(req.domainPath);
      const md = await readDomainMetadata(root);
      const held = spmHeld.get(md.domainId);
      if (held !== undefined) return { lver: held }; // already ours: a retry
      const lease = await spm.holdSpmLease({ id: md.domainId, path: root }, { deadline: ctx.deadline, signal: ctx.signal });
      spmHeld.set(md.domainId, lease.lver);
      return { lver: lease.lver };
    },
  };
}
