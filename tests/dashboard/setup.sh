#!/usr/bin/env bash
# Installs the pinned playwright-core (npm ci) once: see tests/npm-ci-once.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../npm-ci-once.sh" "$here"
