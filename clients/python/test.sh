#!/usr/bin/env bash
# Runs the test suite: setup.sh, then pytest in the venv with any extra arguments
# (e.g. ./test.sh -k watch -x). The exit code is pytest's.
#
# Env: FLEETCARE_BIN (server binary; default <repo>/target/debug/fleetcare).
# Each test server keeps its data in the embedded store, in a temporary data directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
cd "$here"
# No __pycache__ in src/fleetcare/v1: the checked-in generated tree stays exactly what generate.sh makes.
export PYTHONDONTWRITEBYTECODE=1
set +e
"$here/.venv/bin/python" -m pytest "$@"
status=$?
set -e
exit "$status"
