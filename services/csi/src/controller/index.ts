import { csi, SdmeshError, service, type RegisteredService } from '@sdmesh/common';
import { status } from '@grpc/grpc-js';
import type { PluginContext } from '../plugin';

/** The CSI Controller service (being written: every call but the capabilities is refused for now). */
export async function createControllerService(ctx: PluginContext): Promise<{ service: RegisteredService; stop(): Promise<void> }> {
  const notYet = async (): Promise<never> => {
    throw new SdmeshError(status.UNIMPLEMENTED, `the CSI controller of ${ctx.hostName} does not implement this call yet`, 'UNIMPLEMENTED');
  };
  return {
    service: service(csi.ControllerDefinition, {
      createVolume: notYet,
      deleteVolume: notYet,
      controllerPublishVolume: notYet,
      controllerUnpublishVolume: notYet,
      validateVolumeCapabilities: notYet,
      listVolumes: notYet,
      getCapacity: notYet,
      controllerGetCapabilities: async () => ({ capabilities: [] }),
      createSnapshot: notYet,
      deleteSnapshot: notYet,
      listSnapshots: notYet,
      getSnapshot: notYet,
      controllerExpandVolume: notYet,
      controllerGetVolume: notYet,
      controllerModifyVolume: notYet,
    }),
    stop: async () => undefined,
  };
}
