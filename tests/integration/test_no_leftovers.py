"""Killing whatever started a swarm, even with SIGKILL, leaves no swarm process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import time
from client.apps.local_swarm import LocalSwarm
with LocalSwarm(["0:10"]) as swarm:
    print(" ".join(str(p.pid) for p in swarm.procs), flush=True)
    time.sleep(600)
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies awaiting their reaper do not count: they run nothing and hold no port.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def test_sigkill_of_the_starter_stops_dht_and_peer_groups():
    starter = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        groups = [int(pid) for pid in starter.stdout.readline().split()]
        assert len(groups) == 2, "expected a DHT and a peer"
        assert all(group_alive(g) for g in groups)
        os.killpg(starter.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(group_alive(g) for g in groups):
            time.sleep(0.2)
        assert not any(group_alive(g) for g in groups), "swarm processes outlived their starter"
    finally:
        for pgid in [starter.pid] + (groups if "groups" in locals() else []):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
