#!/usr/bin/env bash
# Installs the pinned ccusage (npm ci) for tests/api/usage_ccusage.rs when
# node_modules is missing or was installed from a different package-lock.json;
# otherwise does nothing.
#
# package-lock.json pins ccusage 20.0.24 and its native Linux x64 build
# (@ccusage/ccusage-linux-x64, with integrity). ccusage lists a native build
# per platform as optional dependencies; the lockfile records the others by
# platform only (os/cpu, no tarball), so npm ci skips them here.
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
