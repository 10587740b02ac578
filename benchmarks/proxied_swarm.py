"""A local swarm whose peers are reached only through delay proxies: one `swarm dht`, one
`delay_proxy.py` process, and one `swarm peer` per span announcing its proxy's port. Every
connection to a peer, from the client or from another peer, crosses the proxy, which adds
its delay and counts the bytes.

    with ProxiedSwarm(["0:10", "10:20", "20:30"], delay_ms=10) as swarm:
        swarm.initial_peers, swarm.proxy.set_delay(0), swarm.proxy.total_bytes()
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

from client.apps.local_swarm import LocalSwarm

from delay_proxy import ProxyProcess


def free_port() -> int:
    # Bound and released at once: a peer started right after takes it (a race only with
    # another process binding the same port in that instant).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxiedSwarm:
    def __init__(self, spans: list[str], delay_ms: float = 0.0, model: str = "smollm2-135m-instruct",
                 extra_peer_args: list[str] = (), start_timeout: float = 180.0):
        self.spans, self.delay_ms, self.model = spans, delay_ms, model
        self.extra_peer_args, self.start_timeout = list(extra_peer_args), start_timeout
        self.proxy: ProxyProcess | None = None
        self.peers: list[LocalSwarm] = []
        self.initial_peers: list[str] = []
        self._stack = ExitStack()

    def __enter__(self) -> "ProxiedSwarm":
        try:
            dht = self._stack.enter_context(LocalSwarm([], start_timeout=self.start_timeout))
            self.initial_peers = dht.initial_peers
            bound = [free_port() for _ in self.spans]
            self.proxy = self._stack.enter_context(ProxyProcess(bound, self.delay_ms))
            # One LocalSwarm per peer, as each announces a different port; they start one
            # after another, so a peer's start-up does not slow the others' loading.
            for span, port, public in zip(self.spans, bound, self.proxy.ports):
                # --decode-threads 1: as LocalSwarm gives peers that share a machine (peer/runtime.py).
                args = ["--port", str(port), "--public-host", "127.0.0.1", "--public-port", str(public),
                        "--decode-threads", "1", *self.extra_peer_args]
                self.peers.append(self._stack.enter_context(LocalSwarm(
                    [span], model=self.model, extra_peer_args=args, start_timeout=self.start_timeout,
                    dht_initial_peers=self.initial_peers)))
        except BaseException:
            self._stack.close()
            raise
        return self

    @property
    def peer_procs(self):
        return [proc for peer in self.peers for proc in peer.peer_procs]

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)
