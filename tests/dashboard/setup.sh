#!/usr/bin/env bash
# Installs the pinned dependencies (npm ci) when node_modules is missing or was
# installed from a different package-lock.json; otherwise does nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

stamp=node_modules/.fleetcare-setup.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ -d node_modules ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && [ ! package-lock.json -nt "$stamp" ]; then
  exit 0
fi
npm ci --no-audit --no-fund
echo "$want" > "$stamp"
