#!/usr/bin/env bash
# Regenerates the TypeScript code for ../../proto (fleetcare.v1) and
# vendor/proto (grpc.health.v1) with the pinned buf and the local protoc-gen-es
# plugin from node_modules, as configured in buf.gen.yaml. Nothing is fetched
# at generation time.
#
# Usage: ./generate.sh [OUT_DIR]
#   OUT_DIR defaults to src/gen, the checked-in tree. With an argument, the same
#   files are written there instead (e.g. to diff against src/gen in CI).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [ ! -d node_modules ]; then
  ./setup.sh
fi

out="${1:-src/gen}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --output prefixes the template's out directory (src/gen): the files land in
# $tmp/src/gen, and only those are then copied to OUT_DIR.
node_modules/.bin/buf generate --output "$tmp"
gen="$tmp/src/gen"

if [ -z "${1:-}" ]; then
  # The checked-in tree holds generated files only: replace it wholesale.
  rm -rf src/gen
  mkdir -p src
  cp -R "$gen" src/gen
else
  # Somewhere else: replace only the package directories that are generated.
  mkdir -p "$out"
  for entry in "$gen"/*; do
    rm -rf "${out:?}/$(basename "$entry")"
    cp -R "$entry" "$out/"
  done
fi
