"""hivemind's DHT process, tied to the life of the process that starts it.

`hivemind.DHT` forks a child that runs the DHT and starts the p2pd daemon. A starter killed
with SIGKILL (a peer, a client, `swarm dht`) left both behind as orphans that went on
answering in the DHT (measured alive 90 s later). So the DHT process arms the parent-death
signal as it starts (Linux), and on that signal, or any SIGTERM, stops its p2pd and exits.
p2pd cannot arm one itself (hivemind starts it; the setting is not inherited over fork).
"""

from __future__ import annotations

import os
import signal

import hivemind
import psutil

from .parent_death import signal_on_parent_death

CHILD_STOP_SECONDS = 1.0  # p2pd stops in milliseconds on SIGTERM; SIGKILL after this


class OwnedDHT(hivemind.DHT):
    """`hivemind.DHT` whose process, and its p2pd, stop when the process that started it dies."""

    def __init__(self, *args, **kwargs) -> None:
        self._owner_pid = os.getpid()  # before hivemind's __init__, which forks when start=True
        super().__init__(*args, **kwargs)

    def run(self) -> None:  # in the DHT process
        signal.signal(signal.SIGTERM, _stop_children_and_exit)
        if not signal_on_parent_death(self._owner_pid, signal.SIGTERM):  # the owner died before it was armed
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
