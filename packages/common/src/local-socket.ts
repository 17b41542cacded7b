import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { peerCredentials } from '@sdmesh/sanlock';

/** Who is at the other end of a unix socket connection, as the kernel says (SO_PEERCRED at connect time). */
export function localPeerOf(socket: net.Socket): { pid: number; uid: number } {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (fd === undefined || fd < 0) throw new Error('no file descriptor');
  const cred = peerCredentials(fd);
  return { pid: cred.pid, uid: cred.uid };
}

/**
 * Listens on a unix socket for this host's processes: its directory created 0700, a stale socket of
 * a killed predecessor replaced (anything else at that path is not ours to delete), the socket 0600.
 */
export async function listenUnixSocket(socketPath: string, onConnection: (socket: net.Socket) => void): Promise<net.Server> {
  fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o700 });
  const st = fs.lstatSync(socketPath, { throwIfNoEntry: false });
  if (st?.isSocket()) fs.unlinkSync(socketPath);
  else if (st) throw new Error(`${socketPath} exists and is not a socket`);
  const server = net.createServer(onConnection);
  const oldMask = process.umask(0o077);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
  } finally {
    process.umask(oldMask);
  }
  fs.chmodSync(socketPath, 0o600);
  return server;
}
