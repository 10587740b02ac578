"""The WAN emulation proxy the benchmarks put in front of peers: it must add its delay each way,
keep the byte stream in order and count what it carried (a wrong proxy would make wan.py's
figures meaningless without failing anything)."""

from __future__ import annotations

import importlib.util
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_delay_proxy", Path(__file__).parents[2] / "benchmarks" / "delay_proxy.py")
delay_proxy = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = delay_proxy  # dataclasses look their module up there
_spec.loader.exec_module(delay_proxy)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "proxy closed the connection early"
        out += chunk
    return out


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - start


def test_delay_each_way_order_and_byte_counts(echo_port):
    with delay_proxy.ProxyProcess([echo_port], delay_ms=0) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.ports[0])) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loopback = min(_round_trip(sock, b"x") for _ in range(5))

        proxy.set_delay(40)
        delayed = [_round_trip(sock, b"y") for _ in range(3)]
        # 40 ms each way through the proxy: a round trip is >= 80 ms more than without delay.
        assert min(delayed) >= 0.080
        assert min(delayed) - loopback < 0.080 + 0.100, f"round trips {delayed} s: far more than the delay"

        # Many small writes, sent faster than the delay: all arrive, in order, still delayed.
        messages = [f"{i:05d};".encode() for i in range(500)]
        start = time.perf_counter()
        for m in messages:
            sock.sendall(m)
        received = _recv_exactly(sock, sum(map(len, messages)))
        assert received == b"".join(messages)
        assert time.perf_counter() - start >= 0.080

        stats = proxy.stats()
        expected = 5 * 1 + 3 * 1 + sum(map(len, messages))
        assert stats == [{"to_target": expected, "from_target": expected}]
        assert proxy.total_bytes() == 2 * expected
