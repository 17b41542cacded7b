import { ConfigError } from '@sdmesh/common';

/**
 * The socket path of a CSI endpoint. Orchestrators pass `unix:///abs/path` (CSI_ENDPOINT);
 * a bare absolute path is accepted too. TCP endpoints are refused: the CSI socket has no
 * authentication of its own, only the kernel's word on who connected (see GrpcServer's local socket).
 */
export function csiSocketPath(endpoint: string): string {
  const path = endpoint.startsWith('unix://') ? endpoint.slice('unix://'.length) : endpoint;
  if (!path.startsWith('/')) throw new ConfigError(`--csi-endpoint: "${endpoint}" is not unix:///<absolute path> (TCP endpoints are not served)`);
  if (path.length > 107) throw new ConfigError(`--csi-endpoint: socket path is ${path.length} bytes; unix sockets allow at most 107`);
  return path;
}
