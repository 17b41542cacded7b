#!/usr/bin/env node
// Test helper: runs ONE MetadataTransactions call in its own process, straight from the
// TypeScript sources (transpiled on load with the typescript compiler; no build needed), so a
// test can arm SDMESH_FAULT_POINT and watch the process die there.
//
//   node fault-child.cjs '{"op":"createVolume","request":{...}}'
//
// Prints one JSON line: {"result":...} (exit 0) or {"error":{code,reason,message}} (exit 1).
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
  const { op, request } = JSON.parse(process.argv[2]);
  const { Registry } = require('prom-client');
  const { MetadataTransactions } = require(path.join(repo, 'services/metadata-tx/src/transactions/index.ts'));
  const { InProcessDomainLeaseProvider } = require(path.join(repo, 'services/metadata-tx/src/leases.ts'));
  const { FaultInjector } = require(path.join(repo, 'services/metadata-tx/src/faults.ts'));
  const { pb } = require('@sdmesh/common');
  const tx = new MetadataTransactions({
    leases: new InProcessDomainLeaseProvider(),
    registry: new Registry(),
    hostId: 7,
    faults: new FaultInjector(process.env.SDMESH_FAULT_POINT || ''),
  });
  const requestTypes = {
    formatDomain: pb.FormatDomainRequest,
    createVolume: pb.CreateVolumeRequest,
    deleteVolume: pb.DeleteVolumeRequest,
    deleteImage: pb.DeleteImageRequest,
    updateVolume: pb.UpdateVolumeRequest,
    finalizeMerge: pb.FinalizeMergeRequest,
  };
  try {
    const result = await tx[op](requestTypes[op].fromPartial(request));
    process.stdout.write(JSON.stringify({ result }) + '\n');
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: { code: err.code, reason: err.reason, message: err.message } }) + '\n');
    process.exitCode = 1;
  }
}

main();
