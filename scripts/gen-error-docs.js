#!/usr/bin/env node
// Writes docs/api-errors.md from the reason table in packages/common/src/reasons.ts (built).
// --check: fail if the checked-in page differs (run by `make check`).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { status } = require('@grpc/grpc-js');
const { REASONS } = require('../packages/common/dist/reasons');

const out = path.join(__dirname, '..', 'docs', 'api-errors.md');
const byCode = new Map();
for (const [reason, { code, doc }] of Object.entries(REASONS)) {
  if (!byCode.has(code)) byCode.set(code, []);
  byCode.get(code).push([reason, doc]);
}
const lines = [
  '# Error reasons',
  '',
  'Every error an sdmesh service returns has a gRPC status code, a message for people, and a stable',
  'reason for programs in the `sdmesh-reason` response trailer (sdmctl prints it in brackets).',
  'Match on the reason, not on the message. This page is generated from',
  '`packages/common/src/reasons.ts` by `npm run docs:errors`; do not edit it by hand.',
  '',
];
for (const code of [...byCode.keys()].sort((a, b) => a - b)) {
  lines.push(`## ${status[code]} (${code})`, '', '| reason | meaning |', '|---|---|');
  for (const [reason, doc] of byCode.get(code).sort()) lines.push(`| \`${reason}\` | ${doc.replace(/\|/g, '\\|')} |`);
  lines.push('');
}
const text = lines.join('\n');
if (process.argv[2] === '--check') {
  const have = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : '';
  if (have !== text) {
    console.error('docs/api-errors.md is stale: run `npm run docs:errors` and commit it');
    process.exit(1);
  }
  console.log('docs/api-errors.md is up to date');
} else {
  fs.writeFileSync(out, text);
  console.log(`wrote ${path.relative(process.cwd(), out)} (${Object.keys(REASONS).length} reasons)`);
}
