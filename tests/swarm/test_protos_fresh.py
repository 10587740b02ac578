"""The committed generated code in swarm/wire/proto/ must match protos/swarm.proto.

Fails when someone edits the .proto without running `make protos` (scripts/gen_protos.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = REPO_ROOT / "swarm" / "wire" / "proto"
GENERATED_FILES = ["__init__.py", "swarm_pb2.py", "swarm_pb2_grpc.py"]

# Lines where protoc stamps its own version; they differ between grpcio-tools releases
# without the contract changing.
_VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        check=True, capture_output=True,
    )
    return out


def _without_version_stamps(text: str) -> str:
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def _committed_grpc_tools_version() -> str:
    text = (COMMITTED / "swarm_pb2_grpc.py").read_text()
    return re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.M).group(1)


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_code_matches_proto(regenerated: Path, name: str) -> None:
    fresh = _without_version_stamps((regenerated / name).read_text())
    committed = _without_version_stamps((COMMITTED / name).read_text())
    assert fresh == committed, f"swarm/wire/proto/{name} is stale: run `make protos`"


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_code_is_byte_identical(regenerated: Path, name: str) -> None:
    installed, committed_with = version("grpcio-tools"), _committed_grpc_tools_version()
    if installed != committed_with:
        pytest.skip(f"grpcio-tools {installed} installed, files generated with {committed_with}")
    assert (regenerated / name).read_bytes() == (COMMITTED / name).read_bytes(), (
        f"swarm/wire/proto/{name} differs from a fresh generation: run `make protos`"
    )


def test_grpc_module_uses_package_relative_import() -> None:
    text = (COMMITTED / "swarm_pb2_grpc.py").read_text()
    assert "from . import swarm_pb2 as swarm__pb2" in text
    assert "\nimport swarm_pb2" not in text
