#!/usr/bin/env node
// One CSI endpoint in front of the split plugins, for conformance runs (docs/csi.md,
// Conformance): csi-sanity reads CONTROLLER_SERVICE from the Identity of its node endpoint, so
// with separate controller and node sockets it skips its whole-lifecycle tests. Kubernetes sees
// one plugin (the sidecars call the controller, kubelet the node); this presents it the same way
// to the test: /csi.v1.Node/* goes to the node plugin's socket, everything else (Identity,
// Controller) to the controller's. Raw HTTP/2 passthrough; nothing is decoded or changed.
//
//   node scripts/csi-route-proxy.js <listen socket> <controller socket> <node socket>
'use strict';
const http2 = require('node:http2');
const net = require('node:net');
const fs = require('node:fs');

const [listenPath, controllerPath, nodePath] = process.argv.slice(2);
if (!nodePath) {
  process.stderr.write('usage: csi-route-proxy.js <listen socket> <controller socket> <node socket>\n');
  process.exit(2);
}

const sessions = new Map();
function upstream(socketPath) {
  let session = sessions.get(socketPath);
  if (!session || session.closed || session.destroyed) {
    session = http2.connect('http://localhost', { createConnection: () => net.connect(socketPath) });
    session.on('error', () => sessions.delete(socketPath));
    sessions.set(socketPath, session);
  }
  return session;
}

/** The headers without HTTP/2 pseudo-headers, except those named. */
const withoutPseudo = (headers, keep) => Object.fromEntries(Object.entries(headers).filter(([k]) => !k.startsWith(':') || keep.includes(k)));

fs.rmSync(listenPath, { force: true });
const server = http2.createServer();
server.on('stream', (stream, headers) => {
  const target = headers[':path'].startsWith('/csi.v1.Node/') ? nodePath : controllerPath;
  const request = upstream(target).request(withoutPseudo(headers, [':path', ':method']), { endStream: false });
  stream.pipe(request);
  let trailers = {};
  request.on('response', (responseHeaders) => {
    if (responseHeaders['grpc-status'] !== undefined) {
      // A trailers-only response (an error status): one HEADERS frame that ends the stream.
      stream.respond(withoutPseudo(responseHeaders, [':status']), { endStream: true });
      return;
    }
    stream.respond(withoutPseudo(responseHeaders, [':status']), { waitForTrailers: true });
    request.pipe(stream);
  });
  request.on('trailers', (t) => (trailers = t));
  stream.on('wantTrailers', () => stream.sendTrailers(withoutPseudo(trailers, [])));
  request.on('error', (err) => stream.destroy(err));
  stream.on('error', () => request.close());
});
server.listen(listenPath, () => process.stdout.write(`csi-route-proxy: ${listenPath}: Node -> ${nodePath}, Identity and Controller -> ${controllerPath}\n`));
