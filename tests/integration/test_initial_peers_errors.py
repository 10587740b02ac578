"""Every command with --initial-peers, run for real, given a value that is no multiaddr or the
multiaddr of a DHT that is down: one line on stderr says what was wrong and what to check,
exit code 2 (an argument error) or 1 (nothing reachable), no traceback, and no waiting."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from client import AutoDistributedModelForCausalLM
from swarm.initial_peers import InitialPeersError
from tests.procs import output, spawn, stop, unused_port

pytestmark = pytest.mark.integration

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
FIX = "pass one printed by `swarm dht`, e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
# A command and the arguments it needs besides --initial-peers.
COMMANDS = {
    "dht": ["--host", "127.0.0.1"],
    "peer": ["--host", "127.0.0.1", "--device", "cpu", "--blocks", "0:2"],
    "generate": ["--max-new-tokens", "1", "hello"],
    "status": [],
    "finetune": ["--data", "{data}", "--out", "{out}", "--steps", "1"],
}
BAD_ARGUMENT_SECONDS = 5.0  # no torch, no hivemind: the flag is checked first
# Alone, each gives up in 3-6 s (imports, then p2pd's refused dial); all five at once on two
# cores in ~16 s on a quick day, 44-48 s on a slow one (2026-12-02, under load: torch and
# transformers imported five times over). The bound is for a hang: hivemind itself would wait
# up to 15 s per silent port, a broken join forever.
DEAD_DHT_SECONDS = 75.0


def args_of(command: str, initial_peers: str, folder: Path) -> list[str]:
    rest = [a.format(data=folder / "data.jsonl", out=folder / f"out-{command}") for a in COMMANDS[command]]
    return ["python", "-m", "swarm.cli", command, "--initial-peers", initial_peers, *rest]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"still running after {timeout} s\n{output(proc)}")
    return code, Path(proc.stderr_path).read_text()


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("initial-peers")
    (folder / "data.jsonl").write_text('{"text": "A swarm of peers serves the blocks."}\n')
    return folder


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("value, says", [
    ("bogus", f"--initial-peers 'bogus' is not a multiaddr (must begin with /); {FIX}"),
    ("/ip4/127.0.0.1/tcp/31337",
     f"--initial-peers '/ip4/127.0.0.1/tcp/31337' has no peer id: it must end in /p2p/<peer id>; {FIX}"),
])
def test_a_value_that_is_no_multiaddr_is_an_argument_error(command, value, says, folder):
    started = time.monotonic()
    code, stderr = finish(spawn(args_of(command, value, folder)), timeout=30)
    assert code == 2 and last_line(stderr) == f"swarm {command}: error: {says}", stderr
    assert time.monotonic() - started < BAD_ARGUMENT_SECONDS


@pytest.fixture(scope="module")
def dead_dht_runs(folder: Path) -> Iterator[tuple[str, dict[str, subprocess.Popen], float]]:
    """Every command started at once against a DHT that is down (a port nobody listens on)."""
    dead = f"/ip4/127.0.0.1/tcp/{unused_port()}/p2p/{PEER_ID}"
    started = time.monotonic()
    procs = {command: spawn(args_of(command, dead, folder)) for command in COMMANDS}
    try:
        yield dead, procs, started
    finally:
        for proc in procs.values():
            stop(proc)


@pytest.mark.compat  # hivemind's wording of the failure
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_dht_that_is_down_is_one_line_saying_what_to_check(command, dead_dht_runs):
    dead, procs, started = dead_dht_runs
    code, stderr = finish(procs[command], timeout=DEAD_DHT_SECONDS + 40)
    assert code == 1, stderr
    assert last_line(stderr) == (f"swarm {command}: error: cannot reach any of --initial-peers ({dead}): "
                                 "is `swarm dht` running there, and is its port open from this machine?")
    assert time.monotonic() - started < DEAD_DHT_SECONDS, f"took {time.monotonic() - started:.1f} s"


def test_the_library_refuses_a_bad_multiaddr_before_loading_anything():
    started = time.monotonic()
    with pytest.raises(InitialPeersError, match="'bogus' is not a multiaddr"):
        AutoDistributedModelForCausalLM.from_pretrained("no-such-model", initial_peers="bogus")
    assert time.monotonic() - started < 1.0
