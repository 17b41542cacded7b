#!/usr/bin/env node
// Runs one compiled benchmark: `npm run bench -- <name> [args...]`.
const path = require('node:path');
const fs = require('node:fs');
const [name, ...args] = process.argv.slice(2);
const dist = path.join(__dirname, '..', 'bench', 'dist');
const available = fs
  .readdirSync(dist)
  .filter((f) => f.endsWith('.js') && f !== 'lib.js')
  .map((f) => f.slice(0, -3));
if (!name || !available.includes(name)) {
  console.error(`usage: npm run bench -- <name> [args]\navailable: ${available.join(', ')}`);
  process.exit(2);
}
process.argv = [process.argv[0], path.join(dist, `${name}.js`), ...args];
require(path.join(dist, `${name}.js`));
