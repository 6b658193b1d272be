#!/usr/bin/env bash
# Creates clients/python/.venv (idempotent) and installs this package, editable,
# with its test extras. The pip work is skipped when pyproject.toml and this
# script are unchanged since the last successful run (stamp in the venv), so a
# repeated run takes well under a second.
#
# Env: PYTHON (default python3) is the interpreter the venv is made from.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
stamp="$venv/.fleetcare-setup-stamp"
python="${PYTHON:-python3}"

# Concurrent runs (e.g. two test runs at once) must not pip-install into the same venv together.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$here/.setup.lock"
  flock 9
fi

want="$(cat "$here/pyproject.toml" "$here/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
  && "$venv/bin/python" -c 'import fleetcare, grpc_tools, grpc_health, pytest' >/dev/null 2>&1; then
  exit 0
fi

rm -f "$stamp"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"
echo "$want" >"$stamp"
echo "setup.sh: installed fleetcare-client[test] into $venv" >&2
