"""The peer's node in the hivemind DHT, where it announces its span and finds other peers'
(a process of its own that dies with the peer: swarm/dht_process.py)."""

from __future__ import annotations

import hivemind  # heavy: only a serving peer imports this module (peer/server.py)

from swarm.dht_process import OwnedDHT
from swarm.initial_peers import join_error

from .config import PeerConfig, PeerStartError


def start_dht(config: PeerConfig) -> hivemind.DHT:
    loopback = config.host in ("127.0.0.1", "localhost", "::1")
    host_maddrs = ["/ip4/127.0.0.1/tcp/0"] if loopback else ["/ip4/0.0.0.0/tcp/0"]
    try:
        return OwnedDHT(initial_peers=config.initial_peers or None, host_maddrs=host_maddrs, start=True,
                        client_mode=False)
    except Exception as e:
        raise PeerStartError(str(join_error(e, config.initial_peers))) from e
