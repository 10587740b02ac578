"""Real `swarm dht` / `swarm peer` processes for integration tests, on 127.0.0.1 only.

`swarm_procs` (module-scoped) starts processes for one test module and stops every one of
them, process group and all, when the module ends:

    def test_something(swarm_procs):
        a = swarm_procs.start_peer("--blocks", "0:15")       # starts now, in parallel...
        b = swarm_procs.start_peer("--blocks", "15:30")
        a.wait_ready(); b.wait_ready()                        # ...ready together
        stub = a.stub()                                       # BlockService over real gRPC

or `swarm_procs.peer("--blocks", "0:10")` to start and wait in one call. Peers join the
session's DHT node (`dht_maddr`) unless given `initial_peers`; `swarm_procs.dht()` starts
a fresh node of their own.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from swarm.ready_line import PeerReady
from swarm.wire import swarm_pb2_grpc
from tests.procs import output, spawn, stop, wait_for_line

DHT_LINE = r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$"
PEER_START_TIMEOUT = 90.0  # s; a cold machine imports torch + transformers and loads weights


@dataclass
class PeerProcess:
    """A `swarm peer` process; endpoint and model_id are known once it is ready."""

    proc: subprocess.Popen
    args: list[str]
    start: int = -1
    end: int = -1
    model_name: str = ""
    endpoint: str = ""
    model_id: str = ""
    _channels: list[grpc.Channel] = field(default_factory=list)

    def wait_ready(self, timeout: float = PEER_START_TIMEOUT) -> PeerProcess:
        if not self.endpoint:
            ready = PeerReady.parse(wait_for_line(self.proc, PeerReady.PATTERN.pattern, timeout).group(0))
            self.start, self.end, self.model_name = ready.start, ready.end, ready.model_name
            self.endpoint, self.model_id = ready.endpoint, ready.model_id
        return self

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stub(self, **channel_options) -> swarm_pb2_grpc.BlockServiceStub:
        """A BlockService stub on a new channel (closed when the module's processes stop)."""
        channel = grpc.insecure_channel(self.wait_ready().endpoint, options=list(channel_options.items()))
        self._channels.append(channel)
        return swarm_pb2_grpc.BlockServiceStub(channel)

    def output(self) -> str:
        return output(self.proc)

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


class SwarmProcs:
    """Starts dht and peer processes with logs under `log_dir`; `close` stops them all."""

    def __init__(self, log_dir: Path, initial_peers: list[str]) -> None:
        self.log_dir, self.initial_peers = log_dir, initial_peers
        self._procs: list[subprocess.Popen] = []
        self._peers: list[PeerProcess] = []

    def spawn(self, args: list[str]) -> subprocess.Popen:
        proc = spawn(args, log_dir=self.log_dir)
        self._procs.append(proc)
        return proc

    def dht(self) -> str:
        """Starts a new `swarm dht` node and returns its multiaddr."""
        proc = self.spawn(["python", "-m", "swarm.cli", "dht", "--host", "127.0.0.1"])
        return wait_for_line(proc, DHT_LINE, timeout=30).group(0)

    def start_peer(self, *args: str, initial_peers: list[str] | None = None) -> PeerProcess:
        """Starts `swarm peer ARGS` on 127.0.0.1 without waiting for it to be ready."""
        maddrs = self.initial_peers if initial_peers is None else initial_peers
        argv = ["python", "-m", "swarm.cli", "peer", "--host", "127.0.0.1", "--device", "cpu",
                *[a for maddr in maddrs for a in ("--initial-peers", maddr)], *args]
        peer = PeerProcess(self.spawn(argv), argv)
        self._peers.append(peer)
        return peer

    def peer(self, *args: str, initial_peers: list[str] | None = None) -> PeerProcess:
        return self.start_peer(*args, initial_peers=initial_peers).wait_ready()

    def close(self) -> None:
        for peer in self._peers:
            peer.close_channels()
        for proc in reversed(self._procs):  # peers before the DHT they announce to
            stop(proc)


@pytest.fixture(scope="module")
def swarm_procs(dht_maddr: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmProcs]:
    procs = SwarmProcs(tmp_path_factory.mktemp("swarm-procs"), initial_peers=[dht_maddr])
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="session")
def swarm():
    """The default model split over three peer processes, [0, 10), [10, 20), [20, 30), joined
    through a DHT of their own; started once for the whole run (peer start-up is most of an
    integration module's time on two cores) and stopped with everything it started. Tests using
    it must leave it as they found it: close their sessions, never stop or pause its peers."""
    from tests.procs import LocalSwarm  # forked from the zygote
    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

    resolve_checkpoint(DEFAULT_MODEL)  # convert once, before three peers wait on it
    with LocalSwarm(["0:10", "10:20", "20:30"]) as running:
        yield running
