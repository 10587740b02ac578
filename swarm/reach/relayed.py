"""A peer behind NAT: its gRPC port carried over libp2p streams, through relays.

The peer's DHT daemon cannot serve this: whether a relay is needed is known only after the
dial-back probe, and the daemon's relay options are fixed when it starts. So a NAT'd peer
starts a second daemon that reserves a slot on each relay it was given (static relays;
with relay discovery on, go-libp2p waits for 4 candidates or 3 minutes first). Each libp2p
stream on GRPC is spliced to the local gRPC port, so the servicer sees ordinary connections.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from . import punch
from .probe import GRPC, PING
from .splice import splice

logger = logging.getLogger(__name__)


class _StaticRelaysP2P(P2P):
    @staticmethod
    def _make_process_args(*args, **kwargs) -> list[str]:
        return P2P._make_process_args(*args, **kwargs) + ["-relayDiscovery=false"]


class RelayedEndpoint:
    """Serves `grpc_port` (on 127.0.0.1) to libp2p streams arriving through `relays`."""

    def __init__(self, p2p: P2P, grpc_port: int, relays: list[str], public_ip: str | None) -> None:
        self.p2p, self.grpc_port, self.relays, self.public_ip = p2p, grpc_port, relays, public_ip
        self.bytes_in, self.bytes_out = [0], [0]  # through relays: to the servicer, from it
        self.punched_in, self.punched_out = [0], [0]  # over punched connections
        self.streams = self.punched = 0

    @classmethod
    async def start(cls, grpc_port: int, relays: list[str], public_ip: str | None = None) -> RelayedEndpoint:
        """`public_ip`: this peer's address as probers saw it, for hole punching (None: no punching)."""
        p2p = await _StaticRelaysP2P.create(
            initial_peers=relays, trusted_relays=relays, use_auto_relay=True, force_reachability="private",
            host_maddrs=["/ip4/0.0.0.0/tcp/0"], dht_mode="client")
        endpoint = cls(p2p, grpc_port, relays, public_ip)
        await p2p.add_binary_stream_handler(GRPC, endpoint._grpc)
        await p2p.add_binary_stream_handler(PING, endpoint._ping)
        await p2p.add_binary_stream_handler(punch.PUNCH, endpoint._punch)
        return endpoint

    @property
    def reach_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    @property
    def circuits(self) -> list[str]:
        return [f"{relay}/p2p-circuit/p2p/{self.reach_id}" for relay in self.relays]

    async def _grpc(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = await self._local(writer)
        if local is not None:
            self.streams += 1
            await splice((reader, writer), local, (self.bytes_in, self.bytes_out))

    async def _punch(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.public_ip is None:
            writer.close()
            return
        punched = await punch.answer(reader, writer, self.public_ip)
        if punched is None:
            return
        local = await self._local(punched[1])
        if local is not None:
            self.punched += 1
            await splice(punched, local, (self.punched_in, self.punched_out))

    async def _local(self, writer: asyncio.StreamWriter):
        try:
            return await asyncio.open_connection("127.0.0.1", self.grpc_port)
        except OSError as e:
            logger.warning("cannot reach the local gRPC port %d: %s", self.grpc_port, e)
            writer.close()
            return None

    @staticmethod
    async def _ping(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await asyncio.wait_for(reader.readline(), 10) == b"ping\n":
                writer.write(b"pong\n")
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def shutdown(self) -> None:
        await self.p2p.shutdown()
