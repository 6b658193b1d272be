#!/usr/bin/env bash
# Installs the pinned ccusage (npm ci) once for tests/api/usage_ccusage.rs:
# see tests/npm-ci-once.sh.
#
# package-lock.json pins ccusage 20.0.24 and its native Linux x64 build
# (@ccusage/ccusage-linux-x64, with integrity). ccusage lists a native build
# per platform as optional dependencies; the lockfile records the others by
# platform only (os/cpu, no tarball), so npm ci skips them here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../npm-ci-once.sh" "$here"
