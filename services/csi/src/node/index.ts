import { csi, SdmeshError, service, type RegisteredService } from '@sdmesh/common';
import { status } from '@grpc/grpc-js';
import type { PluginContext } from '../plugin';

/**
 * The CSI Node service. PLACEHOLDER owned by the csi-node engineer (services/csi/src/node/**):
 * replaced by the per-volume qemu-storage-daemon implementation.
 */
export async function createNodeService(ctx: PluginContext): Promise<{ service: RegisteredService; stop(): Promise<void> }> {
  const notYet = async (): Promise<never> => {
    throw new SdmeshError(status.UNIMPLEMENTED, `the CSI node service of ${ctx.nodeId} is not implemented yet`, 'UNIMPLEMENTED');
  };
  return {
    service: service(csi.NodeDefinition, {
      nodeStageVolume: notYet,
      nodeUnstageVolume: notYet,
      nodePublishVolume: notYet,
      nodeUnpublishVolume: notYet,
      nodeGetVolumeStats: notYet,
      nodeExpandVolume: notYet,
      nodeGetCapabilities: async () => ({ capabilities: [] }),
      nodeGetInfo: async () => ({ nodeId: ctx.nodeId }),
    }),
    stop: async () => undefined,
  };
}
