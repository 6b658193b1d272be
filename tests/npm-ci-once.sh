#!/usr/bin/env bash
# Usage: tests/npm-ci-once.sh DIR
# Installs DIR's pinned npm dependencies (npm ci) when DIR/node_modules is
# missing or was installed from a different package-lock.json; otherwise does
# nothing. The test tools' setup scripts (tests/dashboard, tests/ccusage) call it.
set -euo pipefail

cd "$1"
stamp=node_modules/.fleetcare-setup.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ -d node_modules ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && [ ! package-lock.json -nt "$stamp" ]; then
  exit 0
fi
npm ci --no-audit --no-fund
echo "$want" > "$stamp"
