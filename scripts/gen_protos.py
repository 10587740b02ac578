"""Regenerate the Python code for the wire contract (protos/swarm.proto).

Run from anywhere: ``python scripts/gen_protos.py [--out DIR]``. The default output is
``swarm/wire/proto/``, which is committed; ``--out`` exists so a test can regenerate into a
temporary folder and compare byte-for-byte, which catches a changed .proto that nobody
regenerated.

protoc writes ``import swarm_pb2 as swarm__pb2`` into the gRPC module, which only works when
the output folder is on sys.path; we rewrite it into a package-relative import so the module
imports as ``swarm.wire.proto.swarm_pb2_grpc``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
PROTO_FILE = "swarm.proto"
DEFAULT_OUT = REPO_ROOT / "swarm" / "wire" / "proto"

_ABSOLUTE_IMPORT = "import swarm_pb2 as swarm__pb2"
_RELATIVE_IMPORT = "from . import swarm_pb2 as swarm__pb2"
_INIT_TEXT = '"""Generated from protos/swarm.proto by scripts/gen_protos.py; do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and return the files written (sorted)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Relative paths keep absolute folders out of the generated code, so the output is the
    # same wherever the repository lives.
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR.relative_to(REPO_ROOT)}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str((PROTO_DIR / PROTO_FILE).relative_to(REPO_ROOT)),
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)

    grpc_module = out_dir / "swarm_pb2_grpc.py"
    text = grpc_module.read_text()
    if _ABSOLUTE_IMPORT not in text:
        raise RuntimeError(f"{grpc_module}: expected {_ABSOLUTE_IMPORT!r} from protoc, not found")
    grpc_module.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))

    (out_dir / "__init__.py").write_text(_INIT_TEXT)
    return sorted([out_dir / "__init__.py", out_dir / "swarm_pb2.py", grpc_module])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
