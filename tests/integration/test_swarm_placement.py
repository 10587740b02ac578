"""Peers that choose their own blocks (`--num-blocks`), on a DHT of their own: three started
together cover the model; a stopped peer's gap is re-covered by a new one; a replica moves
into the gap another stopped peer leaves; the client measures round trips to real peers."""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import pytest

from client.remote_swarm import RemoteSwarm
from swarm.checkpoint import DEFAULT_MODEL, config_fingerprint, resolve_checkpoint
from swarm.registry import PeerState, make_model_id
from swarm.wire import swarm_pb2
from tests.integration.conftest import PeerProcess, SwarmProcs
from tests.procs import stop

pytestmark = pytest.mark.integration

NUM_BLOCKS = 30
# Short periods: a peer killed with its DHT process vanishes after 3 announce periods, and a
# rebalancing peer notices a gap within a second or two.
FAST = ("--num-blocks", "10", "--announce-period", "1", "--threads", "1")


def resolve_model_id(name: str) -> str:
    checkpoint = resolve_checkpoint(name)
    return make_model_id(checkpoint.name, config_fingerprint(checkpoint.config))


def spans(peers: list[PeerProcess]) -> list[tuple[int, int]]:
    return sorted((p.start, p.end) for p in peers)


def online_spans(client: RemoteSwarm) -> dict[str, tuple[int, int]]:
    """Peer id -> span of every online record in the DHT now."""
    records = client.records(refresh=True)
    return {r.peer_id: (r.start, r.end) for rs in records.values() for r in rs if r.state == PeerState.online}


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return result


class Placed:
    def __init__(self, procs: SwarmProcs, maddr: str, peers: list[PeerProcess], client: RemoteSwarm) -> None:
        self.procs, self.maddr, self.peers, self.client = procs, maddr, peers, client

    def start(self, *args: str) -> PeerProcess:
        return self.procs.start_peer(*FAST, *args, initial_peers=[self.maddr])


@pytest.fixture(scope="module")
def placed(swarm_procs: SwarmProcs) -> Iterator[Placed]:
    maddr = swarm_procs.dht()  # a DHT of their own: no other module's records to place around
    peers = [swarm_procs.start_peer(*FAST, "--balance-period", "0", initial_peers=[maddr]) for _ in range(3)]
    model_id = resolve_model_id(DEFAULT_MODEL)
    client = RemoteSwarm([maddr], model_id, NUM_BLOCKS)  # joins the DHT while the peers start
    try:
        for p in peers:
            p.wait_ready()
        assert {p.model_id for p in peers} == {model_id}
        yield Placed(swarm_procs, maddr, peers, client)
    finally:
        client.shutdown()


def test_three_peers_starting_together_cover_the_model_and_rtts_are_measured(placed):
    assert spans(placed.peers) == [(0, 10), (10, 20), (20, 30)], [p.output() for p in placed.peers]
    chain = placed.client.find_chain()
    assert [(hop.start, hop.end) for hop in chain] == [(0, 10), (10, 20), (20, 30)]
    for p in placed.peers:
        assert 0 < placed.client.routes.rtt[p.endpoint] < 2.0  # measured by an Info call, not the default


def test_gaps_are_re_covered_by_new_peers_and_by_a_replica_moving(placed):
    by_span = {(p.start, p.end): p for p in placed.peers}

    # A peer dies with its DHT process: its records expire after 3 announce periods.
    gone = by_span.pop((10, 20))
    stop(gone.proc)
    wait_until(lambda: (10, 20) not in online_spans(placed.client).values(), 15, "records of a stopped peer expire")

    # Two peers start together: one re-covers the gap, the other doubles a span.
    new = [placed.start("--balance-period", "1") for _ in range(2)]
    for p in new:
        p.wait_ready()
    serving = spans(new + list(by_span.values()))
    assert (10, 20) in spans(new) and set(serving) == {(0, 10), (10, 20), (20, 30)}, [p.output() for p in new]
    double = next(p for p in new if serving.count((p.start, p.end)) == 2)

    # Stop a peer nobody else serves the span of, this time cleanly (SIGTERM to the peer
    # only, as Ctrl-C would): it withdraws its records with tombstones. A replica moves in.
    victim = next(p for span, p in by_span.items() if span != (double.start, double.end))
    os.kill(victim.proc.pid, signal.SIGTERM)
    assert victim.proc.wait(timeout=30) == 0
    assert "withdrawing the records failed" not in victim.output()
    stop(victim.proc)  # whatever of its group is left
    gap = f"{victim.start}:{victim.end}"
    moved = wait_until(lambda: next((p for p in new if f"peer moved: blocks {double.start}:{double.end} -> {gap}"
                                     in p.output()), None), 30, f"a replica moves into {gap}")
    info = moved.stub().Info(swarm_pb2.InfoRequest(), timeout=10)
    assert (info.start, info.end) == (victim.start, victim.end)
    wait_until(lambda: sorted(set(online_spans(placed.client).values())) == [(0, 10), (10, 20), (20, 30)],
               15, "the DHT shows every block served")
