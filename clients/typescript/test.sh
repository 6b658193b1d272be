#!/usr/bin/env bash
# Installs the pinned dependencies when needed (setup.sh: node_modules missing,
# or package-lock.json changed since the last install), then builds and runs
# the tests against the real server. Exit code: the tests'.
#
# The server binary comes from $FLEETCARE_BIN (default: <repo>/target/debug/fleetcare);
# Each server keeps its data in the embedded store, in a temporary data directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
cd "$here"
npm test
