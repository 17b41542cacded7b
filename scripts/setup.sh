#!/usr/bin/env bash
# Installs what sdmesh needs on a Debian machine with Node 20, then builds it. Idempotent:
# every step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v sanlock >/dev/null || need_apt+=(sanlock)
[[ -f /usr/include/sanlock.h ]] || need_apt+=(libsanlock-dev)
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
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

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [[ "$node_major" != 20 ]]; then echo "setup: warning: sdmesh is built for Node 20, this is $(node --version)" >&2; fi

# npm dependencies: reinstall only when package-lock.json changed since the last install.
stamp=node_modules/.sdmesh-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: npm ci"
  # Install scripts are off; the one native build we need (the sanlock addon) runs below.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

# The N-API addon over libsanlock.
if [[ ! -f packages/sanlock/build/Release/sanlock_addon.node || packages/sanlock/src/addon.cc -nt packages/sanlock/build/Release/sanlock_addon.node ]]; then
  echo "setup: building the sanlock addon"
  # Build against the installed Node headers: node-gyp must not try to download them (no network).
  nodedir=$(npm config get nodedir 2>/dev/null || true)
  if [[ -z "$nodedir" || "$nodedir" == undefined ]]; then
    nodedir=$(dirname "$(dirname "$(command -v node)")")
  fi
  if [[ ! -f "$nodedir/include/node/node_api.h" ]]; then
    echo "setup: Node headers not found under $nodedir/include/node (install Debian's nodejs headers, e.g. libnode-dev)" >&2
    exit 1
  fi
  (cd packages/sanlock && ../../node_modules/.bin/node-gyp rebuild --nodedir="$nodedir" --loglevel=error >/dev/null)
fi

echo "setup: compiling TypeScript"
npm run --silent build
echo "setup: done"
