"""generate.sh reproduces the checked-in generated code byte for byte."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict

from conftest import CLIENT_DIR

CHECKED_IN = CLIENT_DIR / "src" / "fleetcare" / "v1"


def files(directory: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "v1"
    subprocess.run([str(CLIENT_DIR / "generate.sh"), str(out)], check=True, capture_output=True, timeout=300)
    generated = files(out)
    protos = sorted(p.stem for p in (CLIENT_DIR.parents[1] / "proto" / "fleetcare" / "v1").glob("*.proto"))
    expected_names = sorted(
        ["__init__.py"] + [f"{stem}{suffix}" for stem in protos for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    )
    assert sorted(generated) == expected_names
    checked_in = files(CHECKED_IN)
    assert sorted(checked_in) == expected_names, "stale or extra files in src/fleetcare/v1: run ./generate.sh"
    stale = [name for name in expected_names if generated[name] != checked_in[name]]
    assert stale == [], f"regenerate with ./generate.sh: {stale}"
