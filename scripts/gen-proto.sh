#!/usr/bin/env bash
# Regenerates packages/common/src/gen from proto/ with buf + ts-proto.
# --check: regenerate into a temp dir and fail if the checked-in code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=packages/common/src/gen
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  npx buf generate --template buf.gen.yaml -o "$tmp" >/dev/null
  # buf writes to <out>/<plugin out>; compare that subtree
  if ! diff -r "$tmp/$out" "$out" >/dev/null; then
    diff -r "$tmp/$out" "$out" | head -40
    echo "generated code is stale: run 'npm run proto:gen' and commit the result" >&2
    exit 1
  fi
  echo "generated code is up to date"
else
  rm -rf "$out"
  npx buf generate --template buf.gen.yaml
  echo "generated $(find "$out" -name '*.ts' | wc -l) files in $out"
fi
