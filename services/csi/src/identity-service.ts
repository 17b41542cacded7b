import { csi, service } from '@sdmesh/common';
import { DRIVER_NAME, DRIVER_VERSION } from './plugin';

const { PluginCapability_Service_Type: ServiceType, PluginCapability_VolumeExpansion_Type: ExpansionType } = csi;

/**
 * The CSI Identity service. The controller advertises the controller service and topology;
 * both modes advertise online expansion (the external-resizer reads it from the controller,
 * kubelet from the node).
 */
export function identityService(mode: 'controller' | 'node', ready: () => boolean) {
  const capabilities: csi.PluginCapability[] = [
    ...(mode === 'controller'
      ? [ServiceType.CONTROLLER_SERVICE, ServiceType.VOLUME_ACCESSIBILITY_CONSTRAINTS].map((type): csi.PluginCapability => ({
          type: { $case: 'service', service: { type } },
        }))
      : [{ type: { $case: 'service', service: { type: ServiceType.VOLUME_ACCESSIBILITY_CONSTRAINTS } } } satisfies csi.PluginCapability]),
    { type: { $case: 'volumeExpansion', volumeExpansion: { type: ExpansionType.ONLINE } } },
  ];
  return service(csi.IdentityDefinition, {
    getPluginInfo: async () => ({ name: DRIVER_NAME, vendorVersion: DRIVER_VERSION, manifest: { mode } }),
    getPluginCapabilities: async () => ({ capabilities }),
    probe: async () => ({ ready: ready() }),
  });
}
