"""Hole punching: a direct TCP connection to a peer behind NAT, by simultaneous open.

libp2p's DCUtR is on in every daemon, but it only punches towards public addresses (by
go-multiaddr's list), so we do the TCP part ourselves, coordinated over the relayed stream:

1. the dialer binds a port and sends, over PUNCH through the relay, its public IP (as a
   prober saw it), that port and a nonce;
2. the peer binds a port of its own and answers with its public IP and that port;
3. both connect() from their bound port to the other's public address at once. Each SYN
   leaving a NAT opens the mapping the other's SYN comes in by (routers that keep the source
   port, as Linux MASQUERADE and most home routers do); TCP's simultaneous open joins them;
4. the dialer sends the nonce first, so the peer knows the connection is the one it agreed to,
   and the peer splices it to its gRPC port.

Nothing punched in PUNCH_SECONDS: the caller uses the relay. A NAT that picks a new port per
destination (symmetric) defeats this, and the relay carries the traffic then.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket

logger = logging.getLogger(__name__)

PUNCH = "/swarmlm/punch/1"
PUNCH_SECONDS = 4.0  # SYNs at 0, 1 and 3 s: one retransmission after a SYN the other NAT dropped
_LINE = 1024


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


async def _simultaneous_open(sock: socket.socket, remote: tuple[str, int]) -> socket.socket | None:
    """`sock` connected to `remote`, or None (closed) after PUNCH_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PUNCH_SECONDS
    while True:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, remote), deadline - loop.time())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (OSError, asyncio.TimeoutError) as e:
            port = sock.getsockname()[1]
            sock.close()
            if loop.time() > deadline - 0.2:
                logger.debug("no punched connection to %s: %s", remote, e)
                return None
            await asyncio.sleep(0.2)  # refused (the other SYN not out yet): again, from the same port
            sock = _bound_socket(port)


def _ipv4(value) -> str | None:
    try:
        return str(ipaddress.IPv4Address(value)) if isinstance(value, str) else None
    except ValueError:
        return None


async def dial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, my_ip: str):
    """Over an open PUNCH stream (`reader`, `writer`): a punched (reader, writer), or None."""
    sock = _bound_socket()
    nonce = os.urandom(16).hex()
    try:
        writer.write(json.dumps({"ip": my_ip, "port": sock.getsockname()[1], "nonce": nonce}).encode() + b"\n")
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.readline(), PUNCH_SECONDS) or b"{}")
    except (OSError, ValueError, asyncio.TimeoutError) as e:
        logger.debug("punch request failed: %s", e)
        sock.close()
        return None
    finally:
        writer.close()
    ip, port = _ipv4(answer.get("ip")), answer.get("port")
    if ip is None or not isinstance(port, int) or not 0 < port < 65536:
        sock.close()
        return None
    punched = await _simultaneous_open(sock, (ip, port))
    if punched is None:
        return None
    punched_reader, punched_writer = await asyncio.open_connection(sock=punched)
    punched_writer.write(nonce.encode() + b"\n")
    return punched_reader, punched_writer


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, my_ip: str):
    """The peer's side of a PUNCH stream: a punched (reader, writer) that proved the nonce, or None."""
    try:
        line = await asyncio.wait_for(reader.readline(), PUNCH_SECONDS)
        request = json.loads(line) if 0 < len(line) <= _LINE else {}
    except (OSError, ValueError, asyncio.TimeoutError):
        writer.close()
        return None
    ip, port, nonce = _ipv4(request.get("ip")), request.get("port"), request.get("nonce")
    if ip is None or not isinstance(port, int) or not 0 < port < 65536 or not isinstance(nonce, str) \
            or len(nonce) != 32:
        writer.close()
        return None
    sock = _bound_socket()
    try:
        writer.write(json.dumps({"ip": my_ip, "port": sock.getsockname()[1]}).encode() + b"\n")
        await writer.drain()
    except OSError:
        sock.close()
        return None
    finally:
        writer.close()
    punched = await _simultaneous_open(sock, (ip, port))
    if punched is None:
        return None
    punched_reader, punched_writer = await asyncio.open_connection(sock=punched)
    try:
        if await asyncio.wait_for(punched_reader.readline(), PUNCH_SECONDS) == nonce.encode() + b"\n":
            return punched_reader, punched_writer
    except (OSError, asyncio.TimeoutError):
        pass
    punched_writer.close()
    return None
