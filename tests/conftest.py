"""Shared fixtures. Integration fixtures start real processes on 127.0.0.1 (see tests/procs.py)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.deprecations import deprecations_are_errors
from tests.procs import running, wait_for_line


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A deprecation that transformers, PEFT or hivemind raise on our call fails the test."""
    with deprecations_are_errors() as found:
        result = yield
    if found:
        pytest.fail("our code calls a deprecated dependency API (renamed upstream soon):\n  "
                    + "\n  ".join(dict.fromkeys(found)), pytrace=False)
    return result


@pytest.fixture(scope="session")
def dht_maddr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Multiaddr of a `swarm dht` bootstrap node shared by the whole test session."""
    folder = tmp_path_factory.mktemp("dht")
    maddr_file = folder / "maddrs.txt"
    args = ["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1", "--maddr-file", str(maddr_file)]
    with running(args, log_dir=folder) as proc:
        yield wait_for_line(proc, r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", timeout=30).group(0)
