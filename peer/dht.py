"""The peer's node in the hivemind DHT, where it announces its span and finds other peers':
a child process (hivemind forks it, and it starts the p2pd daemon) that dies with the peer.

hivemind's DHT process and its p2pd outlive a parent killed with SIGKILL: orphans that go on
answering in the DHT (measured alive 90 s later). So the DHT process arms the parent-death
signal as it starts (Linux), and on that signal, or any SIGTERM, stops its p2pd and exits.
p2pd cannot arm one itself (hivemind starts it; the setting is not inherited over fork).
"""

from __future__ import annotations

import os
import signal

import hivemind  # heavy: only a serving peer imports this module (peer/server.py)
import psutil

from swarm.parent_death import signal_on_parent_death

from .config import PeerConfig, PeerStartError

CHILD_STOP_SECONDS = 1.0  # p2pd stops in milliseconds on SIGTERM; SIGKILL after this


def start_dht(config: PeerConfig) -> hivemind.DHT:
    loopback = config.host in ("127.0.0.1", "localhost", "::1")
    host_maddrs = ["/ip4/127.0.0.1/tcp/0"] if loopback else ["/ip4/0.0.0.0/tcp/0"]
    try:
        return PeerDHT(initial_peers=config.initial_peers or None, host_maddrs=host_maddrs, start=True,
                       client_mode=False)
    except Exception as e:
        raise PeerStartError(f"cannot join the DHT through {config.initial_peers or 'no initial peers'}: {e}; "
                             "check --initial-peers (a multiaddr printed by `swarm dht`)") from e


class PeerDHT(hivemind.DHT):
    """hivemind's DHT process, and its p2pd, stopped when the peer that started it dies."""

    def __init__(self, *args, **kwargs) -> None:
        self._peer_pid = os.getpid()  # before hivemind's __init__, which forks when start=True
        super().__init__(*args, **kwargs)

    def run(self) -> None:  # in the DHT process
        signal.signal(signal.SIGTERM, _stop_children_and_exit)
        if not signal_on_parent_death(self._peer_pid, signal.SIGTERM):  # the peer died before it was armed
            _stop_children_and_exit()
        super().run()


def _stop_children_and_exit(*_) -> None:
    """Ends this process's children (p2pd) and then this process, at once."""
    children = psutil.Process().children()
    for child in children:
        child.terminate()
    _, alive = psutil.wait_procs(children, timeout=CHILD_STOP_SECONDS)
    for child in alive:
        child.kill()
    os._exit(0)
