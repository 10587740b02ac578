"""libp2p circuit multiaddrs ('.../p2p/RELAY/p2p-circuit/p2p/PEER'): how a record names the
ways to a peer behind NAT, and which peer they lead to. Light: the registry checks records
with it."""

from __future__ import annotations

import re

CIRCUIT_RE = re.compile(r"(/[A-Za-z0-9.:_-]+)+/p2p/\w+/p2p-circuit/p2p/(\w+)")


def circuit_peer(maddr: str) -> str | None:
    """The peer id a circuit multiaddr leads to, or None if `maddr` is not one."""
    match = CIRCUIT_RE.fullmatch(maddr)
    return match.group(2) if match else None
