"""A peer, a `swarm dht` node or a client killed with SIGKILL takes its children with it:
hivemind's DHT process and that process's p2pd daemon must not stay behind as orphans, still
answering in the DHT."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.integration.conftest import DHT_LINE
from tests.procs import wait_for_line

pytestmark = pytest.mark.integration

GRACE_SECONDS = 5.0  # the children notice their parent's death at once (a signal); stopping takes a moment


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those that run (zombies awaiting their reaper run nothing and hold no port)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def test_sigkill_of_a_peer_leaves_none_of_its_descendants(swarm_procs):
    peer = swarm_procs.peer("--blocks", "0:2")
    descendants = psutil.Process(peer.proc.pid).children(recursive=True)
    names = sorted(p.name() for p in descendants)
    assert len(descendants) >= 2, f"expected the DHT process and its p2pd, found {names}"
    peer.proc.kill()
    peer.proc.wait(timeout=10)
    deadline = time.monotonic() + GRACE_SECONDS
    while still_running(descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"{p.pid} {p.name()} (parent {p.ppid()})" for p in still_running(descendants)]
    assert not left, f"descendants of the killed peer still run {GRACE_SECONDS:g} s later: {left}"


def assert_descendants_die_with(proc, what: str) -> None:
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 2, f"expected the DHT process and its p2pd under {what}, found " \
                                  f"{sorted(p.name() for p in descendants)}"
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + GRACE_SECONDS
    while still_running(descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"{p.pid} {p.name()} (parent {p.ppid()})" for p in still_running(descendants)]
    assert not left, f"descendants of the killed {what} still run {GRACE_SECONDS:g} s later: {left}"


def test_sigkill_of_a_dht_node_or_a_client_leaves_none_of_their_descendants(swarm_procs, dht_maddr):
    node = swarm_procs.spawn(["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1"])
    wait_for_line(node, DHT_LINE, timeout=30)
    assert_descendants_die_with(node, "swarm dht")
    script = ("import sys, time\nfrom client import RemoteSwarm\n"
              f"RemoteSwarm([{dht_maddr!r}], 'm', 30)\nprint('joined', flush=True)\ntime.sleep(120)\n")
    client = swarm_procs.spawn(["python", "-c", script])
    wait_for_line(client, r"^joined$", timeout=60)
    assert_descendants_die_with(client, "client")
