#!/usr/bin/env node
'use strict';
/*
 * Test fixture: a plain-JS "host agent" that talks to ONE sanlock daemon (the one named by
 * SANLOCK_RUN_DIR in its environment) through the compiled addon directly (no TS needed).
 * libsanlock can only talk to one daemon per process, so integration tests run one agent per
 * simulated host (or several per host when they need distinct lease-holding processes).
 *
 * Protocol: newline-delimited JSON on stdin/stdout.
 *   request  {"id": 1, "op": "acquire", "args": {...}}
 *   response {"id": 1, "ok": true, "result": ...} | {"id": 1, "ok": false, "error": {"code": -243, "message": "..."}}
 *   event    {"event": "hangup", "reason": "disconnect"}   (registered fd hung up: daemon died)
 *            {"event": "ready", "pid": 1234}                (first line)
 *
 * Ops: register, acquire, release, inquire, killpath, acquireForPid, releaseForPid, inquireForPid,
 *      addLockspace, inqLockspace, remLockspace, getHosts, getLockspaces, readResource,
 *      readResourceOwners, writeResource, close, exit.
 * Resources are given as {lockspace, name, path, offset, shared?}.
 */
const path = require('node:path');
const readline = require('node:readline');

const addon = require(path.join(__dirname, '..', 'build', 'Release', 'sanlock_addon.node'));

const SANLK_RES_SHARED = 0x4;
const SANLK_ACQUIRE_OWNER_NOWAIT = 0x8;

let fd = -1;
let watcher = null;

function res(r) {
  return {
    lockspace: r.lockspace,
    name: r.name,
    disks: [{ path: r.path, offset: r.offset || 0 }],
    flags: r.shared ? SANLK_RES_SHARED : 0,
  };
}

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function ls(a) {
  return { name: a.name, hostId: a.hostId || 0, path: a.path || '', offset: a.offset || 0 };
}

const ops = {
  async register() {
    if (fd >= 0) return { fd };
    fd = addon.register();
    watcher = new addon.HangupWatcher(fd, (reason) => send({ event: 'hangup', reason }));
    // one round trip so the daemon has processed the registration before anyone acquires for us
    await addon.inquire(fd, -1);
    return { fd, pid: process.pid, cloexec: addon.getCloexec(fd) };
  },
  async acquire(a) {
    const flags = a.ownerNoWait ? SANLK_ACQUIRE_OWNER_NOWAIT : 0;
    const t0 = process.hrtime.bigint();
    await addon.acquire(fd, -1, flags, a.resources.map(res));
    return { ms: Number(process.hrtime.bigint() - t0) / 1e6 };
  },
  async release(a) {
    await addon.release(fd, -1, 0, a.resources.map(res));
  },
  async inquire() {
    return addon.inquire(fd, -1);
  },
  async killpath(a) {
    await addon.killpath(fd, a.flags || 0, a.path, a.args || '');
  },
  async acquireForPid(a) {
    const flags = a.ownerNoWait ? SANLK_ACQUIRE_OWNER_NOWAIT : 0;
    await addon.acquire(-1, a.pid, flags, a.resources.map(res));
  },
  async releaseForPid(a) {
    await addon.release(-1, a.pid, 0, a.resources.map(res));
  },
  async inquireForPid(a) {
    return addon.inquire(-1, a.pid);
  },
  async addLockspace(a) {
    await addon.addLockspace(ls(a), a.async ? 1 : 0, a.ioTimeout || 0);
  },
  async inqLockspace(a) {
    return addon.inqLockspace(ls(a), 0);
  },
  async remLockspace(a) {
    await addon.remLockspace(ls(a), a.flags || 0);
  },
  async getHosts(a) {
    return addon.getHosts(a.lockspace, a.hostId || 0);
  },
  async getLockspaces() {
    return addon.getLockspaces();
  },
  async readResource(a) {
    return addon.readResource({ lockspace: '', name: '', disks: [{ path: a.path, offset: a.offset || 0 }] });
  },
  async readResourceOwners(a) {
    return addon.readResourceOwners(res(a));
  },
  async close() {
    if (watcher) watcher.stop();
    watcher = null;
    if (fd >= 0) addon.closeFd(fd);
    fd = -1;
  },
  async exit(a) {
    setImmediate(() => process.exit(a && a.code ? a.code : 0));
  },
};

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    send({ id: null, ok: false, error: { code: 0, message: 'bad json: ' + e.message } });
    return;
  }
  const fn = ops[msg.op];
  if (!fn) {
    send({ id: msg.id, ok: false, error: { code: 0, message: 'unknown op ' + msg.op } });
    return;
  }
  Promise.resolve()
    .then(() => fn(msg.args || {}))
    .then(
      (result) => send({ id: msg.id, ok: true, result: result === undefined ? null : result }),
      (err) =>
        send({
          id: msg.id,
          ok: false,
          error: { code: typeof err.code === 'number' ? err.code : 0, message: String(err.message || err) },
        }),
    );
});
// stdin closed (test runner gone): exit, releasing our leases
rl.on('close', () => process.exit(0));

send({ event: 'ready', pid: process.pid });
