"""Userspace WAN emulation for the benchmarks: TCP proxies that hold every chunk for a fixed
one-way delay in each direction, deliver in order, and count the bytes they carry.

This kernel has no netem, so a link's latency is emulated in front of each peer: the peer
announces the proxy's port (`swarm peer --public-host 127.0.0.1 --public-port P`), and every
connection to it, from the client or from another peer, crosses the delay both ways.

The proxies run in their own process, so that the benchmark client's GIL never holds a
packet back. `ProxyProcess` starts and drives one:

    with ProxyProcess(targets=[peer_port], delay_ms=10) as proxy:
        proxy.ports        # where to connect instead of each target
        proxy.set_delay(0)
        proxy.stats()      # [{"to_target": bytes, "from_target": bytes}, ...], one per target

As a command: python benchmarks/delay_proxy.py [--delay-ms 10] LISTEN:TARGET [LISTEN:TARGET ...]
(LISTEN 0 takes any free port) prints `ready PORT ...`, then answers one JSON line per command
on stdin: `delay MS`, `stats`; end of stdin stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass

CHUNK = 1 << 16


@dataclass
class Link:
    """One proxied port: where it forwards, and the bytes it carried each way."""

    target_port: int
    to_target: int = 0
    from_target: int = 0


class DelayProxies:
    """All the links of one process, sharing one delay (seconds, changeable at any time)."""

    def __init__(self, delay: float):
        self.delay = delay
        self.links: list[Link] = []

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link,
                    upstream: bool) -> None:
        # One queue per direction: chunks leave in the order they came, each no earlier than
        # its arrival + delay, so a burst keeps its spacing and nothing is reordered.
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                if upstream:
                    link.to_target += len(data)
                else:
                    link.from_target += len(data)
                queue.put_nowait((time.monotonic() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(None)
        try:
            await sender
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still be talking
        except (ConnectionError, OSError):
            pass

    async def _connect(self, link: Link, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", link.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pump(client_reader, target_writer, link, upstream=True),
                             self._pump(target_reader, client_writer, link, upstream=False))
        for writer in (target_writer, client_writer):
            writer.close()

    async def listen(self, listen_port: int, target_port: int) -> asyncio.Server:
        link = Link(target_port)
        self.links.append(link)
        return await asyncio.start_server(lambda r, w: self._connect(link, r, w), "127.0.0.1", listen_port)

    def command(self, line: str) -> dict:
        word, _, arg = line.strip().partition(" ")
        if word == "delay":
            self.delay = float(arg) / 1000
            return {"delay_ms": self.delay * 1000}
        if word == "stats":
            return {"links": [{"to_target": k.to_target, "from_target": k.from_target} for k in self.links]}
        return {"error": f"unknown command {line.strip()!r}; use 'delay MS' or 'stats'"}


async def serve(routes: list[tuple[int, int]], delay_ms: float) -> None:
    proxies = DelayProxies(delay_ms / 1000)
    servers = [await proxies.listen(listen, target) for listen, target in routes]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print("ready " + " ".join(map(str, ports)), flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        print(json.dumps(proxies.command(line)), flush=True)
    for server in servers:
        server.close()


class ProxyProcess:
    """A `delay_proxy.py` process in front of `targets` (ports on 127.0.0.1)."""

    def __init__(self, targets: list[int], delay_ms: float = 0.0):
        self.targets, self.delay_ms = list(targets), delay_ms
        self.ports: list[int] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "ProxyProcess":
        routes = [f"0:{port}" for port in self.targets]
        self._proc = subprocess.Popen([sys.executable, __file__, "--delay-ms", str(self.delay_ms), *routes],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        line = self._proc.stdout.readline()
        if not line.startswith("ready "):
            self.__exit__()
            raise RuntimeError(f"delay proxy did not start (said {line!r})")
        self.ports = [int(p) for p in line.split()[1:]]
        return self

    def _ask(self, command: str) -> dict:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def set_delay(self, delay_ms: float) -> None:
        self._ask(f"delay {delay_ms}")
        self.delay_ms = delay_ms

    def stats(self) -> list[dict]:
        return self._ask("stats")["links"]

    def total_bytes(self) -> int:
        return sum(link["to_target"] + link["from_target"] for link in self.stats())

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        try:
            self._proc.stdin.close()  # end of stdin: the proxy stops by itself
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc = None


def _route(text: str) -> tuple[int, int]:
    listen, sep, target = text.partition(":")
    if not sep or not listen.isdigit() or not target.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN:TARGET (ports; LISTEN 0 = any free port)")
    return int(listen), int(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay, each direction")
    parser.add_argument("routes", type=_route, nargs="+", metavar="LISTEN:TARGET")
    args = parser.parse_args()
    asyncio.run(serve(args.routes, args.delay_ms))


if __name__ == "__main__":
    main()
