#!/usr/bin/env node
// Test helper: runs ONE MetadataTransactions call in its own process, straight from the
// TypeScript sources (transpiled on load with the typescript compiler; no build needed), so a
// test can arm SDMESH_FAULT_POINT and watch the process die there.
//
//   node fault-child.cjs '{"op":"createVolume","request":{...}}'
//
// Prints one JSON line: {"result":...} (exit 0) or {"error":{code,reason,message}} (exit 1).
// With "requests": [...] instead of "request", runs the calls at once (they share domain lease
// holds: group commit) and prints {"results":[{result}|{error}, ...]}. SDMESH_FAULT_HIT=<n>
// (default 1) dies at the n-th time the armed point is reached, e.g. in the 2nd transaction of a hold
// (the lease is granted after 500 ms, so all the calls are queued by then and share the first hold).
'use strict';
const Module = require('node:module');
const path = require('node:path');
const fs = require('node:fs');
const crypto = require('node:crypto');
const os = require('node:os');
const ts = require('typescript');

// Transpiled output is cached by content hash: the tests start many children.
const cacheDir = path.join(os.tmpdir(), 'sdmesh-fault-child-cache');
fs.mkdirSync(cacheDir, { recursive: true });

const repo = path.resolve(__dirname, '../../..');
const originalResolve = Module._resolveFilename;
Module._resolveFilename = function resolve(request, ...rest) {
  if (request === '@sdmesh/common') request = path.join(repo, 'packages/common/src/index.ts');
  return originalResolve.call(this, request, ...rest);
};
require.extensions['.ts'] = (module, filename) => {
  const source = fs.readFileSync(filename, 'utf8');
  const cached = path.join(cacheDir, crypto.createHash('sha256').update(filename).update(source).digest('hex') + '.js');
  let outputText;
  try {
    outputText = fs.readFileSync(cached, 'utf8');
  } catch {
    outputText = ts.transpileModule(source, {
      fileName: filename,
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true, sourceMap: false },
    }).outputText;
    const temp = `${cached}.${process.pid}`;
    fs.writeFileSync(temp, outputText);
    fs.renameSync(temp, cached);
  }
  module._compile(outputText, filename);
};

async function main() {
  const { op, request, requests } = JSON.parse(process.argv[2]);
  const { Registry } = require('prom-client');
  const { MetadataTransactions } = require(path.join(repo, 'services/metadata-tx/src/transactions/index.ts'));
  const { InProcessDomainLeaseProvider } = require(path.join(repo, 'services/metadata-tx/src/leases.ts'));
  const { FaultInjector } = require(path.join(repo, 'services/metadata-tx/src/faults.ts'));
  const { pb } = require('@sdmesh/common');
  const dieAtHit = Number(process.env.SDMESH_FAULT_HIT || 1);
  let hits = 0;
  const leases = new InProcessDomainLeaseProvider();
  if (requests) {
    // Like sanlock, the lease takes a while to come: by then every call has queued, so they share one hold.
    const withDomainLease = leases.withDomainLease.bind(leases);
    leases.withDomainLease = async (...args) => {
      await new Promise((resolve) => setTimeout(resolve, 500));
      return withDomainLease(...args);
    };
  }
  const tx = new MetadataTransactions({
    leases,
    groupCommit: { maxHoldMs: 60_000 },
    registry: new Registry(),
    hostId: 7,
    faults: new FaultInjector(process.env.SDMESH_FAULT_POINT || '', () => {
      if (++hits >= dieAtHit) process.kill(process.pid, 'SIGKILL');
    }),
  });
  const requestTypes = {
    formatDomain: pb.FormatDomainRequest,
    createVolume: pb.CreateVolumeRequest,
    deleteVolume: pb.DeleteVolumeRequest,
    deleteImage: pb.DeleteImageRequest,
    updateVolume: pb.UpdateVolumeRequest,
    finalizeMerge: pb.FinalizeMergeRequest,
  };
  if (requests) {
    const results = await Promise.all(
      requests.map((r) =>
        tx[op](requestTypes[op].fromPartial(r)).then(
          (result) => ({ result }),
          (err) => ({ error: { code: err.code, reason: err.reason, message: err.message } }),
        ),
      ),
    );
    process.stdout.write(JSON.stringify({ results }) + '\n');
    return;
  }
  try {
    const result = await tx[op](requestTypes[op].fromPartial(request));
    process.stdout.write(JSON.stringify({ result }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: { code: err.code, reason: err.reason, message: err.message } }) + '\n');
    process.exitCode = 1;
  }
}

main();
