#!/usr/bin/env node
// Init step of the per-host pod: finds this node's sanlock host id (1..250, unique in
// every lockspace) and writes it to a file the other containers read into SDMESH_HOST_ID.
//
//   host-id.js --node <node name> --out <file> --from-label <label key>
//       reads the label from the Node object and checks no other node has the same id
//       (needs RBAC "get" and "list" on nodes; the API address,
//       token and CA are the pod's service account ones; SDMESH_KUBE_API overrides the
//       address, for tests)
//   host-id.js --node <node name> --out <file> --from-map <dir>
//       reads <dir>/<node name>, a ConfigMap mounted as files (values hostIds.map)
//
// Exit code 2 with one clear line on stderr when the id is missing or invalid: the pod then
// stays in Init and `kubectl describe` shows why, instead of a host joining lockspaces with a
// guessed id (two hosts with one id would corrupt each other's delta leases).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const https = require('node:https');
const http = require('node:http');

const SA_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

function fail(msg) {
  process.stderr.write(`host-id: error: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const value = argv[i + 1];
    if (!['--node', '--out', '--from-label', '--from-map'].includes(key)) fail(`unknown option ${key}`);
    if (value === undefined) fail(`${key} needs a value`);
    opts[key.slice(2)] = value;
  }
  if (!opts.node) fail('--node is required (the node name, from the downward API spec.nodeName)');
  if (!opts.out) fail('--out is required');
  if (!!opts['from-label'] === !!opts['from-map']) fail('give exactly one of --from-label or --from-map');
  return opts;
}

function validate(raw, where) {
  const text = String(raw).trim();
  if (!/^[0-9]+$/.test(text)) fail(`${where} is "${text}": a host id must be an integer 1..250`);
  const id = Number(text);
  if (id < 1 || id > 250) fail(`${where} is ${id}: a host id must be 1..250 (the hosts sdmesh's lease areas serve)`);
  return id;
}

function getJson(url, headers, ca) {
  return new Promise((resolve, reject) => {
    const lib = url.startsWith('https:') ? https : http;
    const req = lib.get(url, { headers, ca, timeout: 10000 }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`GET ${url}: HTTP ${res.statusCode}: ${body.slice(0, 200)}`));
        try {
          resolve(JSON.parse(body));
        } catch (err) {
          reject(new Error(`GET ${url}: not JSON: ${err.message}`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: timed out`)));
    req.on('error', reject);
  });
}

async function fromLabel(node, label) {
  let base = process.env.SDMESH_KUBE_API;
  const headers = { accept: 'application/json' };
  let ca;
  if (!base) {
    const host = process.env.KUBERNETES_SERVICE_HOST;
    const port = process.env.KUBERNETES_SERVICE_PORT || '443';
    if (!host) fail('not in a Kubernetes pod (KUBERNETES_SERVICE_HOST unset) and SDMESH_KUBE_API not given');
    base = `https://${host.includes(':') ? `[${host}]` : host}:${port}`;
    ca = fs.readFileSync(path.join(SA_DIR, 'ca.crt'));
  }
  const tokenFile = path.join(SA_DIR, 'token');
  if (fs.existsSync(tokenFile)) headers.authorization = `Bearer ${fs.readFileSync(tokenFile, 'utf8').trim()}`;
  let nodeObj;
  try {
    nodeObj = await getJson(`${base}/api/v1/nodes/${encodeURIComponent(node)}`, headers, ca);
  } catch (err) {
    fail(`cannot read node ${node}: ${err.message}`);
  }
  const labels = (nodeObj.metadata && nodeObj.metadata.labels) || {};
  if (!(label in labels)) fail(`node ${node} has no label ${label}: set it with kubectl label node ${node} ${label}=<1..250>`);
  const id = validate(labels[label], `label ${label} of node ${node}`);
  // Two nodes with one id would overwrite each other's delta lease: refuse to start.
  let others;
  try {
    const selector = encodeURIComponent(`${label}=${labels[label].trim()}`);
    others = await getJson(`${base}/api/v1/nodes?labelSelector=${selector}`, headers, ca);
  } catch (err) {
    fail(`cannot list nodes to check that host id ${id} is unique: ${err.message}`);
  }
  const clash = (others.items || []).map((n) => n.metadata.name).filter((n) => n !== node);
  if (clash.length) fail(`host id ${id} of node ${node} is also the ${label} label of ${clash.join(', ')}: host ids must be unique`);
  return id;
}

function fromMap(node, dir) {
  const file = path.join(dir, node);
  if (!fs.existsSync(file)) fail(`node ${node} is not in hostIds.map (no ${file}): add it to the chart values`);
  return validate(fs.readFileSync(file, 'utf8'), `hostIds.map entry of node ${node}`);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const id = opts['from-label'] ? await fromLabel(opts.node, opts['from-label']) : fromMap(opts.node, opts['from-map']);
  fs.mkdirSync(path.dirname(opts.out), { recursive: true });
  fs.writeFileSync(`${opts.out}.tmp`, `${id}\n`);
  fs.renameSync(`${opts.out}.tmp`, opts.out);
  process.stdout.write(`host-id: node ${opts.node} has host id ${id}\n`);
}

main().catch((err) => fail(err && err.message ? err.message : String(err)));
