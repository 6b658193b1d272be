#!/usr/bin/env bash
# Installs the pinned dependencies when needed (setup.sh: node_modules missing,
# or package-lock.json changed since the last install), then builds and runs
# the tests against the real server. Exit code: the tests'.
#
# The server binary comes from $FLEETCARE_BIN (default: <repo>/target/debug/fleetcare);
# Postgres from $FLEETCARE_TEST_PG_URL (default: postgres://postgres@127.0.0.1:5432).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
cd "$here"
npm test
