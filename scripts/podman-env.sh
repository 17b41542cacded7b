# Sourced by scripts/image.sh and scripts/containers-test.sh: installs the container tools from
# Debian when missing and points podman at deploy/docker/containers.conf (runc, ulimits a
# sandboxed root may set) unless the caller gave its own CONTAINERS_CONF.
# shellcheck shell=bash

sdmesh_need_container_tools() {
  local need=()
  command -v podman >/dev/null || need+=(podman)
  command -v buildah >/dev/null || need+=(buildah)
  command -v skopeo >/dev/null || need+=(skopeo)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v runc >/dev/null || need+=(runc)
  # newuidmap/newgidmap: podman wants them even as root.
  command -v newuidmap >/dev/null || need+=(uidmap)
  # catatonit: the init process of a pod's infra container (podman builds its pause image from it).
  [[ -x /usr/libexec/podman/catatonit || -x /usr/bin/catatonit ]] || need+=(catatonit)
  # iptables: the CNI bridge and portmap plugins publish the pods' ports with it (only a Suggests of podman).
  command -v iptables >/dev/null || need+=(iptables)
  if ((${#need[@]})); then
    echo "containers: installing Debian packages: ${need[*]}"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/docker/containers.conf}"
