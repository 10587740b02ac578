"""The dial-back probe: a peer asks DHT nodes whether they can reach it, and how.

Every `swarm dht` node and every serving peer answers PROBE streams. A request is one JSON line:

    {"ports": [31337], "reach_id": "12D3...", "circuits": ["/ip4/.../p2p/R/p2p-circuit/p2p/12D3..."]}

and the answer one line:

    {"observed": "198.51.100.2", "direct": ["198.51.100.2:31337"], "relays": [...], "circuit_ok": true}

- `direct`: the ports the prober could open a TCP connection to, at the address it sees the
  asker's libp2p connection come from. It dials nothing else, so a prober cannot be used to
  scan third parties.
- `relays`: the prober's own multiaddrs when it serves as a relay (`swarm dht --relay`).
- `circuit_ok`: with `circuits`, whether the prober reached `reach_id` through one of them
  and got a pong on PING: the relayed path works end to end.

Everything in a request is untrusted and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field

import varint  # hivemind's own dependency, which its multiaddr copy uses
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from .circuits import circuit_peer

logger = logging.getLogger(__name__)

PROBE = "/swarmlm/reach-probe/1"
PING = "/swarmlm/reach-ping/1"
GRPC = "/swarmlm/grpc/1"

DIAL_SECONDS = 2.0  # a TCP connect that takes longer counts as failed (routers drop, they do not refuse)
CIRCUIT_SECONDS = 6.0
MAX_LINE = 8192
MAX_PORTS = 4
MAX_CIRCUITS = 4


@dataclass
class ProbeAnswer:
    prober: str
    observed: str | None = None
    direct: list[str] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)
    circuit_ok: bool | None = None


def observed_ip(addr: Multiaddr | str | None) -> str | None:
    """The IP a direct libp2p connection came from; None for relayed or odd addresses."""
    text = str(addr or "")
    parts = text.split("/")
    if "p2p-circuit" in text or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    return parts[2]


class DaemonMaddr:
    """A multiaddr as the libp2p daemon reads it. hivemind's copy of py-multiaddr writes /p2p/
    values as CIDs, and the daemon wants bare multihashes: it refuses a circuit address so
    written ("length greater than remaining number of bytes in buffer")."""

    _P2P = 421

    def __init__(self, text: str) -> None:
        self.text = text

    def to_bytes(self) -> bytes:
        head, *peers = self.text.split("/p2p/")
        out = Multiaddr(head).to_bytes() if head else b""
        for part in peers:
            peer, _, rest = part.partition("/")
            digest = PeerID.from_base58(peer).to_bytes()
            out += varint.encode(self._P2P) + varint.encode(len(digest)) + digest
            if rest:
                out += Multiaddr("/" + rest).to_bytes()
        return out

    def __str__(self) -> str:
        return self.text


async def _tcp_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_SECONDS)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def ping_through(p2p: P2P, reach_id: str, circuits: list[str]) -> bool:
    """Whether `reach_id` answers PING through one of `circuits` (an existing connection counts)."""
    peer = PeerID.from_base58(reach_id)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(p2p._client.connect(peer, [DaemonMaddr(c) for c in circuits]), CIRCUIT_SECONDS)
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, PING), CIRCUIT_SECONDS)
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable this way"
        logger.debug("ping to %s failed: %s", reach_id, e)
        return False
    try:
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), CIRCUIT_SECONDS) == b"pong\n"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


class Prober:
    """Answers PROBE streams on `p2p`; `relays` are this node's multiaddrs if it is a relay."""

    def __init__(self, p2p: P2P, relays: list[str] | None = None) -> None:
        self.p2p, self.relays = p2p, list(relays or [])

    async def serve(self) -> None:
        await self.p2p.add_binary_stream_handler(PROBE, self._handle)

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CIRCUIT_SECONDS)
            request = json.loads(line) if 0 < len(line) <= MAX_LINE else {}
            answer = await self.answer(request if isinstance(request, dict) else {}, observed_ip(info.addr))
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except Exception as e:  # noqa: BLE001 - a bad asker gets no answer, and the prober goes on
            logger.debug("probe from %s failed: %s", info.peer_id, e)
        finally:
            writer.close()

    async def answer(self, request: dict, observed: str | None) -> dict:
        ports = [p for p in request.get("ports", []) if isinstance(p, int) and 0 < p < 65536][:MAX_PORTS]
        direct: list[str] = []
        if observed is not None and ports:
            opened = await asyncio.gather(*(_tcp_open(observed, port) for port in ports))
            host = f"[{observed}]" if ":" in observed else observed
            direct = [f"{host}:{port}" for port, ok in zip(ports, opened) if ok]
        answer: dict = {"observed": observed, "direct": direct, "relays": self.relays}
        reach_id, circuits = request.get("reach_id"), request.get("circuits")
        if isinstance(reach_id, str) and isinstance(circuits, list):
            named = [c for c in circuits[:MAX_CIRCUITS] if isinstance(c, str) and len(c) <= 256
                     and circuit_peer(c) == reach_id]
            answer["circuit_ok"] = bool(named) and await ping_through(self.p2p, reach_id, named)
        return answer


async def ask(p2p: P2P, prober: PeerID, request: dict, timeout: float = 10.0) -> ProbeAnswer | None:
    """`prober`'s answer to `request`, or None if it gave none (not ours, down, or too slow)."""
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(prober, PROBE), timeout)
    except Exception as e:  # noqa: BLE001 - e.g. a plain hivemind node, which has no such handler
        logger.debug("no probe from %s: %s", prober, e)
        return None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        data = json.loads(line) if 0 < len(line) <= MAX_LINE else None
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        logger.debug("bad probe answer from %s: %s", prober, e)
        return None
    finally:
        writer.close()
    if not isinstance(data, dict):
        return None
    strings = lambda key: [s for s in data.get(key) or [] if isinstance(s, str) and len(s) <= 256][:8]  # noqa: E731
    observed = data.get("observed")
    return ProbeAnswer(prober=prober.to_base58(), observed=observed if isinstance(observed, str) else None,
                       direct=strings("direct"), relays=strings("relays"),
                       circuit_ok=data.get("circuit_ok") if isinstance(data.get("circuit_ok"), bool) else None)


async def ask_all(p2p: P2P, probers: list[PeerID], request: dict, timeout: float = 10.0) -> list[ProbeAnswer]:
    answers = await asyncio.gather(*(ask(p2p, prober, request, timeout) for prober in probers))
    return [a for a in answers if a is not None]


def peer_ids(maddrs: list[str]) -> list[PeerID]:
    """The peer ids at the end of multiaddrs ('/.../p2p/12D3...'); others are skipped."""
    ids = []
    for maddr in maddrs:
        _, sep, tail = str(maddr).rpartition("/p2p/")
        if sep and tail:
            with contextlib.suppress(Exception):
                ids.append(PeerID.from_base58(tail))
    return ids
