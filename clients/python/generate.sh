#!/usr/bin/env bash
# Regenerates the Python code for proto/fleetcare/v1/*.proto with the pinned
# grpcio-tools of the venv (setup.sh), never a system protoc:
#   <name>_pb2.py, <name>_pb2.pyi, <name>_pb2_grpc.py for each proto, and __init__.py.
#
# Usage: generate.sh [OUT_DIR]
#   OUT_DIR defaults to src/fleetcare/v1 (the checked-in tree). With OUT_DIR the
#   same files are written there instead, e.g. for a CI check:
#     out=$(mktemp -d) && clients/python/generate.sh "$out" && diff -r -x __pycache__ "$out" clients/python/src/fleetcare/v1
# Earlier generated files in OUT_DIR (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, __init__.py)
# are removed first, so a deleted proto leaves nothing behind; nothing else is touched.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$here/src/fleetcare/v1}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

"$here/setup.sh"
py="$here/.venv/bin/python"
# The well-known types (google/protobuf/*.proto) ship inside grpcio-tools.
wkt="$("$py" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Relative proto paths from proto/: the generated code names its source
# "fleetcare/v1/x.proto" and imports "fleetcare.v1.x_pb2", wherever the repo lives.
cd "$repo/proto"
protos=(fleetcare/v1/*.proto)
"$py" -m grpc_tools.protoc -I. -I"$wkt" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  "${protos[@]}"

cat >"$tmp/fleetcare/v1/__init__.py" <<'PY'
"""Generated from proto/fleetcare/v1 by clients/python/generate.sh. Do not edit."""
PY

rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py "$out"/__init__.py
cp "$tmp"/fleetcare/v1/* "$out"/
echo "generate.sh: wrote $(ls "$tmp/fleetcare/v1" | wc -l) files to $out" >&2
