import type { Logger, MeshTls, ServiceMetrics } from '@sdmesh/common';

/** The driver name orchestrators know us by (CSIDriver object, StorageClass provisioner). */
export const DRIVER_NAME = 'csi.sdmesh.io';
export const DRIVER_VERSION = '0.1.0';

/**
 * Topology: a storage domain is a topology segment. A node reports one key per domain it
 * reaches, `topology.csi.sdmesh.io/domain-<domain id>: "true"`; a volume is accessible from
 * the segment of its domain. (One key per domain because CSI gives a node a single segment map
 * and a host reaches several domains.)
 */
export const TOPOLOGY_DOMAIN_PREFIX = 'topology.csi.sdmesh.io/domain-';
export const domainTopologyKey = (domainId: string) => TOPOLOGY_DOMAIN_PREFIX + domainId;

/** The domain ids of a segment map's domain keys. */
export function topologyDomains(segments: Record<string, string>): string[] {
  return Object.entries(segments)
    .filter(([k, v]) => k.startsWith(TOPOLOGY_DOMAIN_PREFIX) && v === 'true')
    .map(([k]) => k.slice(TOPOLOGY_DOMAIN_PREFIX.length));
}

/** What main.ts hands to the controller and node plugins. */
export interface PluginContext {
  /** This host's name (node mode: also the CSI node id unless --node-id). */
  hostName: string;
  nodeId: string;
  /** Address of the scheduler's public API (mTLS, with `tls`). */
  schedulerAddress: string;
  /** This host's lease-manager unix socket (node mode). */
  leaseManagerAddress: string;
  /** Directory for the plugin's own state (node mode: per-volume daemons, sockets). */
  stateDir: string;
  tls: MeshTls;
  log: Logger;
  metrics: ServiceMetrics;
}
