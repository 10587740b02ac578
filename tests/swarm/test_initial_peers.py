"""`--initial-peers` checked before any daemon starts, and hivemind's start failures as one line
(swarm/initial_peers.py); the commands themselves: tests/integration/test_initial_peers_errors.py."""

from __future__ import annotations

import inspect
import subprocess
import sys

import hivemind
import pytest
from hivemind.p2p import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from swarm.initial_peers import (DHTJoinError, InitialPeersError, _multiaddr_class, explained_join, join_error,
                                 parse_initial_peers)
from tests.procs import REPO_ROOT, unused_port

pytestmark = pytest.mark.compat  # hivemind's multiaddr parser and its start failures' wording

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
GOOD = [f"/ip4/203.0.113.5/tcp/31337/p2p/{PEER_ID}", f"/ip6/::1/tcp/31337/p2p/{PEER_ID}",
        f"/dns4/dht.example.org/tcp/31337/p2p/{PEER_ID}", f"/ip4/127.0.0.1/udp/31337/quic/p2p/{PEER_ID}",
        f"/ip4/203.0.113.5/tcp/1/p2p/{PEER_ID}/p2p-circuit/p2p/{PEER_ID}"]


@pytest.mark.parametrize("maddr", GOOD)
def test_multiaddrs_with_a_peer_id_pass_unchanged(maddr):
    assert parse_initial_peers([maddr]) == [maddr]


def test_commas_and_repeats_give_every_multiaddr_once_each():
    assert parse_initial_peers([f" {GOOD[0]} , {GOOD[1]}", GOOD[2]]) == GOOD[:3]
    assert parse_initial_peers([]) == []


@pytest.mark.parametrize("value, says", [
    ("bogus", "'bogus' is not a multiaddr (must begin with /)"),
    ("/ip4/999.1.1.1/tcp/1/p2p/" + PEER_ID, "is not a multiaddr (ip4: base address '999.1.1.1' is not IPv4)"),
    ("/ip4/127.0.0.1/tcp/70000/p2p/" + PEER_ID, "is not a multiaddr (tcp: "),
    ("/ip4/127.0.0.1/tcp/1/p2p/QmXYZ", "is not a multiaddr (p2p: "),
    ("/ip4/127.0.0.1/tcp/31337", "'/ip4/127.0.0.1/tcp/31337' has no peer id: it must end in /p2p/<peer id>"),
    (f"/p2p/{PEER_ID}/ip4/127.0.0.1/tcp/1", "has no peer id"),
    ("", "'' names no multiaddr"),
    (" , ", "' , ' names no multiaddr"),
])
def test_a_bad_value_is_one_line_naming_it_and_the_fix(value, says):
    with pytest.raises(InitialPeersError) as caught:
        parse_initial_peers([GOOD[0], value])
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith("--initial-peers ") and says in message, message
    assert "\n" not in message and "printed by `swarm dht`, e.g. /ip4/" in message


def test_the_parser_is_hiveminds_own_and_loads_without_hivemind():
    """A bad flag fails in a fraction of a second: hivemind (and torch) are not imported."""
    script = ("import sys\nfrom swarm.initial_peers import parse_initial_peers, _multiaddr_class\n"
              f"parse_initial_peers([{GOOD[0]!r}])\n"
              "import inspect; print(inspect.getfile(_multiaddr_class()))\n"
              "assert 'hivemind' not in sys.modules and 'torch' not in sys.modules, 'heavy imports'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == inspect.getfile(Multiaddr) == inspect.getfile(_multiaddr_class())


def test_a_dead_dht_is_one_line_saying_what_to_check():
    """A real hivemind DHT started against a closed port: P2PDaemonError 'failed to connect to
    bootstrap peers' becomes the line the commands print."""
    dead = f"/ip4/127.0.0.1/tcp/{unused_port()}/p2p/{PEER_ID}"
    with pytest.raises(DHTJoinError) as caught, explained_join([dead]):
        hivemind.DHT(initial_peers=[dead], client_mode=True, start=True).shutdown()
    assert str(caught.value) == (f"cannot reach any of --initial-peers ({dead}): is `swarm dht` running there, "
                                 "and is its port open from this machine?")
    assert "failed to connect to bootstrap peers" in str(caught.value.__cause__)


def test_hiveminds_other_start_failures_become_one_line():
    peers = GOOD[:2]
    timed_out = join_error(P2PDaemonError("Daemon failed to start in 15.0 seconds"), peers)
    assert str(timed_out).startswith(f"cannot reach any of --initial-peers ({GOOD[0]}, {GOOD[1]}) in 15 s: is ")
    silent = join_error(RuntimeError("DHTNode bootstrap failed: none of the initial_peers responded to a ping. "
                                     "(set ensure_bootstrap_success=False to ignore)"), peers)
    assert str(silent).startswith("cannot reach any of --initial-peers")
    taken = join_error(P2PDaemonError("Daemon failed to start: 2026/01/01 10:00:00 failed to listen on any "
                                      "addresses:\n  address already in use"), [])
    assert str(taken) == "cannot start a DHT node: failed to listen on any addresses: address already in use"
    assert str(join_error(P2PDaemonError("Daemon failed to start in 15.0 seconds"), [])) == \
        "cannot start a DHT node: Daemon failed to start in 15.0 seconds"
