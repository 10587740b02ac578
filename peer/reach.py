"""How this peer can be reached, found out at start by dial-back probes (swarm/reach/probe.py),
and the one line that tells its owner: directly, through a relay, or not at all, and what to do.

- Listening on loopback only: nothing to find out.
- The initial peers are asked to open a TCP connection to the gRPC port at the address they
  see this peer's connection come from. If one can, that address is announced.
- If none can but some are relays (`swarm dht --relay`), a libp2p daemon of this peer's own
  reserves slots on them (swarm/reach/relayed.py), and each circuit is dialed back through
  before it goes into the record.
- If no initial peer answers the probe at all (an older node), the peer announces what it is
  configured with, as before, and says that it could not check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from swarm.reach.probe import Prober, ask_all, peer_ids
from swarm.reach.relayed import RelayedEndpoint

from .config import PeerConfig, format_endpoint

logger = logging.getLogger(__name__)

RELAY_CHECK_SECONDS = 20.0  # reservations are usually made in well under a second
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Reach:
    endpoint: str
    line: str  # for the owner, printed at start
    relays: list[str] = field(default_factory=list)  # circuit multiaddrs, when relayed
    relayed: RelayedEndpoint | None = None

    async def close(self) -> None:
        if self.relayed is not None:
            await self.relayed.shutdown()


def _advice(port: int) -> str:
    return f"forward TCP port {port} to this machine and pass --public-host with your public address"


async def find_reach(config: PeerConfig, dht, port: int) -> Reach:
    """Runs the probes (a few seconds at most when behind NAT) and answers others' from now on."""
    public_port = config.public_port or port
    configured = format_endpoint(config.announced_host, public_port)
    if config.host in _LOOPBACK:
        return Reach(configured, f"reachable directly at {configured} (listening on loopback: this machine only)")
    p2p = await dht.replicate_p2p()
    await Prober(p2p).serve()  # every serving peer dials others back too
    probers = peer_ids(config.initial_peers)
    if not probers:
        return Reach(configured, f"reachability unknown: no --initial-peers to dial this peer back; announcing "
                                 f"{configured}")
    started = time.perf_counter()
    answers = await ask_all(p2p, probers, {"ports": [public_port]})
    logger.debug("probe answers in %.2f s: %s", time.perf_counter() - started, answers)
    direct = [address for answer in answers for address in answer.direct]
    if config.public_host:
        if direct or not answers:
            return Reach(configured, f"reachable directly at {configured} (--public-host)")
        return Reach(configured, f"--public-host {config.public_host} given, but no initial peer could open TCP "
                                 f"port {public_port} here; check the port forwarding and firewall")
    if direct:
        return Reach(direct[0], f"reachable directly at {direct[0]}")
    if not answers:
        return Reach(configured, f"reachability unknown: none of --initial-peers answered the dial-back probe; "
                                 f"announcing {configured}")
    relays = list(dict.fromkeys(relay for answer in answers for relay in answer.relays))
    if not relays:
        return Reach(configured, f"unreachable: behind NAT (seen as {answers[0].observed}) and no relay among "
                                 "--initial-peers; start `swarm dht --relay` on a public machine and pass it in "
                                 f"--initial-peers, or {_advice(port)}")
    relayed = await RelayedEndpoint.start(port, relays[:3], public_ip=answers[0].observed)
    working = await _check_circuits(p2p, probers, relayed)
    if not working:
        await relayed.shutdown()
        return Reach(configured, f"unreachable: behind NAT, and no relay of {len(relays)} carried a connection "
                                 f"back within {RELAY_CHECK_SECONDS:g} s; {_advice(port)}")
    names = ", ".join(c.split("/p2p-circuit")[0] for c in working)
    return Reach(configured, f"behind NAT, reachable through relay {names}; for a faster path forward TCP port "
                             f"{port} to this machine, or pass --public-host", working, relayed)


async def _check_circuits(p2p, probers, relayed: RelayedEndpoint) -> list[str]:
    """The circuits some prober could dial back through, in the relays' order. Asked again
    until every relay has granted its reservation, for RELAY_CHECK_SECONDS at most, or half
    that once one circuit works."""
    started, working = time.monotonic(), set()
    while True:
        for circuit in relayed.circuits:
            if circuit not in working:
                answers = await ask_all(p2p, probers, {"reach_id": relayed.reach_id, "circuits": [circuit]})
                if any(answer.circuit_ok for answer in answers):
                    working.add(circuit)
        patience = RELAY_CHECK_SECONDS / 2 if working else RELAY_CHECK_SECONDS
        if len(working) == len(relayed.circuits) or time.monotonic() - started > patience:
            return [c for c in relayed.circuits if c in working]
        await asyncio.sleep(0.5)
