"""Dialing peers behind NAT: a local TCP endpoint per relayed peer, spliced onto libp2p streams.

`dial_target(record)` is what a gRPC channel should dial for a peer record: its endpoint when
it is reachable directly, else 127.0.0.1:PORT of a tunnel. Each TCP connection gRPC opens to
the tunnel is carried, best first:

1. by a direct TCP connection hole-punched to the peer (punch.py), coordinated through the
   first of its relays that works (SWARMLM_HOLE_PUNCH=0 turns this off);
2. else by one libp2p stream to the peer through that relay.

A relay that failed is tried last from then on, so a reconnect goes through another one.

The streams go through the libp2p daemon of the process's DHT (`dht.replicate_p2p()`), on an
event loop thread of their own: callers (a client's generate loop) are synchronous.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Awaitable, Callable

from hivemind.p2p import P2P, PeerID

from . import punch
from .circuits import circuit_peer
from .probe import CIRCUIT_SECONDS, GRPC, DaemonMaddr, ask_all
from .splice import splice

logger = logging.getLogger(__name__)


class _Tunnel:
    def __init__(self, reach_id: str, circuits: tuple[str, ...]) -> None:
        self.reach_id, self.circuits = reach_id, list(circuits)
        self.failed: list[str] = []  # most recent failure last
        self.current: str | None = None  # the relay the last connection went through
        self.port = 0
        self.bytes_sent, self.bytes_received = [0], [0]  # through relays
        self.punched_bytes = [0]
        self.paths: list[str] = []  # "punched" or "relayed", per connection carried

    def put_last(self, circuit: str) -> None:
        """`circuit` failed: it is tried after every other from now on."""
        self.failed = [c for c in self.failed if c != circuit] + [circuit]

    def order(self) -> list[str]:
        fresh = [c for c in self.circuits if c not in self.failed]
        return fresh + [c for c in self.failed if c in self.circuits]


class Tunnels:
    """The process's tunnels; `p2p` makes the P2P they use, on first need."""

    def __init__(self, p2p: Callable[[], Awaitable[P2P]], probers: list[PeerID] | None = None) -> None:
        self._make_p2p, self.probers = p2p, list(probers or [])
        self.punching = os.environ.get("SWARMLM_HOLE_PUNCH", "1") != "0"
        self._my_ip: str | None = None
        self._asked_ip = False
        self._p2p: P2P | None = None
        self._p2p_ready: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # started with the first tunnel: most clients need none
        self._by_peer: dict[str, _Tunnel] = {}
        self._by_endpoint: dict[str, _Tunnel] = {}
        self._lock = threading.Lock()

    def endpoint(self, reach_id: str, circuits: tuple[str, ...]) -> str:
        with self._lock:
            tunnel = self._by_peer.get(reach_id)
            if tunnel is None:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                    threading.Thread(target=self._loop.run_forever, daemon=True, name="reach-tunnels").start()
                tunnel = _Tunnel(reach_id, circuits)
                tunnel.port = asyncio.run_coroutine_threadsafe(self._listen(tunnel), self._loop).result(10)
                self._by_peer[reach_id] = tunnel
                self._by_endpoint[f"127.0.0.1:{tunnel.port}"] = tunnel
            else:
                tunnel.circuits = list(circuits)  # the record's newest relays
            return f"127.0.0.1:{tunnel.port}"

    def route_failed(self, endpoint: str) -> bool:
        """A call through tunnel `endpoint` failed: its relay goes last. True if another relay
        is left to try (the peer itself may be fine), False if `endpoint` is no tunnel or it has
        no other way."""
        tunnel = self._by_endpoint.get(endpoint)
        if tunnel is None or tunnel.current is None:
            return False
        tunnel.put_last(tunnel.current)
        tunnel.current = None
        return len(tunnel.circuits) > 1

    def relayed_bytes(self) -> int:
        return sum(t.bytes_sent[0] + t.bytes_received[0] for t in self._by_peer.values())

    def punched_bytes(self) -> int:
        return sum(t.punched_bytes[0] for t in self._by_peer.values())

    def paths(self) -> list[str]:
        return [path for t in self._by_peer.values() for path in t.paths]

    async def _public_ip(self) -> str | None:
        """This machine's address as the probers see it (asked once), for hole punching."""
        if not self._asked_ip:
            self._asked_ip = True
            answers = await ask_all(self._p2p, self.probers, {"ports": []}, timeout=5.0)
            self._my_ip = next((a.observed for a in answers if a.observed), None)
        return self._my_ip

    async def _punched(self, peer: PeerID):
        if not self.punching or await self._public_ip() is None:
            return None
        try:
            _, reader, writer = await asyncio.wait_for(self._p2p.call_binary_stream_handler(peer, punch.PUNCH),
                                                       CIRCUIT_SECONDS)
        except Exception as e:  # noqa: BLE001 - an older peer, or the relay went: no punching
            logger.debug("no punch stream to %s: %s", peer, e)
            return None
        return await punch.dial(reader, writer, self._my_ip)

    async def _listen(self, tunnel: _Tunnel) -> int:
        server = await asyncio.start_server(lambda r, w: self._carry(tunnel, r, w), "127.0.0.1", 0)
        return server.sockets[0].getsockname()[1]

    async def _carry(self, tunnel: _Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._p2p_ready is None:
            self._p2p_ready = asyncio.Lock()
        async with self._p2p_ready:
            if self._p2p is None:
                self._p2p = await self._make_p2p()
        peer = PeerID.from_base58(tunnel.reach_id)
        for circuit in tunnel.order():
            try:
                await asyncio.wait_for(self._p2p._client.connect(peer, [DaemonMaddr(circuit)]), CIRCUIT_SECONDS)
                punched = await self._punched(peer)
                if punched is not None:
                    tunnel.paths.append("punched")
                    await splice((reader, writer), punched, (tunnel.punched_bytes, tunnel.punched_bytes))
                    return
                _, remote_reader, remote_writer = await asyncio.wait_for(
                    self._p2p.call_binary_stream_handler(peer, GRPC), CIRCUIT_SECONDS)
            except Exception as e:  # noqa: BLE001 - this relay does not work now: try the next
                logger.info("cannot reach %s through %s: %s", tunnel.reach_id[:16], circuit, e)
                tunnel.put_last(circuit)
                continue
            tunnel.current = circuit
            tunnel.paths.append("relayed")
            await splice((reader, writer), (remote_reader, remote_writer),
                         (tunnel.bytes_sent, tunnel.bytes_received))
            return
        logger.warning("peer %s is unreachable through every relay it announced", tunnel.reach_id[:16])
        writer.close()


_tunnels: Tunnels | None = None
_tunnels_lock = threading.Lock()


def install(p2p: Callable[[], Awaitable[P2P]], probers: list[PeerID] | None = None) -> Tunnels:
    """The process's tunnels; `p2p` makes their P2P unless one was made already (the newest
    DHT's daemon is used, so a client that replaced its DHT before any tunnel still works).
    `probers` (the initial peers) tell this machine's public address, for hole punching."""
    global _tunnels
    with _tunnels_lock:
        if _tunnels is None:
            _tunnels = Tunnels(p2p, probers)
        elif _tunnels._p2p is None:
            _tunnels._make_p2p, _tunnels.probers = p2p, list(probers or [])
        return _tunnels


def dial_target(record) -> str:
    """What to dial for a PeerRecord: its endpoint, or its tunnel if it is reached through relays."""
    if not record.relays:
        return record.endpoint
    if _tunnels is None:
        raise RuntimeError(f"peer {record.peer_id[:16]} is behind NAT, and this process has no libp2p "
                           "daemon to reach it (install one with swarm.reach.tunnels.install)")
    return _tunnels.endpoint(circuit_peer(record.relays[0]), tuple(record.relays))


def route_failed(endpoint: str) -> bool:
    return _tunnels is not None and _tunnels.route_failed(endpoint)
