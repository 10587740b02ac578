"""client.routing: chain choice over fake records and fake round-trip times; RTT measurement
with a fake ping (real peers: tests/integration/test_swarm_placement.py)."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from client import remote_swarm
from client.remote_swarm import RemoteSwarm
from client.routing import DEFAULT_HOP_SECONDS, MissingBlocksError, RouteFinder, RttTable
from swarm.registry import PeerRecord, PeerState
from tests.client.fakes import MODEL_ID, FlagsDHT, by_block, peer



def route(routes: RouteFinder, records, **kwargs) -> list[str]:
    return [hop.peer.peer_id for hop in routes.find_chain(records, **kwargs)]


# --- inference: least expected latency ------------------------------------------------------


def test_cost_is_time_per_token_through_each_peer_span():
    records = by_block(peer("whole", 0, 30, throughput=5.0),
                       peer("a", 0, 10, 10.0), peer("b", 10, 20, 10.0), peer("c", 20, 30, 10.0))
    # Throughput is tokens/s through a peer's whole span: "whole" takes 0.2 s per token for
    # all 30 blocks, the chain a -> b -> c 3 x 0.1 s.
    assert route(RouteFinder(MODEL_ID, 30), records) == ["whole"]


def test_measured_round_trips_decide_between_replicas():
    near, far = peer("near", 0, 30, throughput=100.0), peer("far", 0, 30, throughput=125.0)
    routes = RouteFinder(MODEL_ID, 30)
    # Compute: 10 ms near, 8 ms far. Round trips: 1 ms near, 5 ms far -> near wins (11 < 13).
    routes.rtt[near.endpoint], routes.rtt[far.endpoint] = 0.001, 0.005
    assert route(routes, by_block(near, far)) == ["near"]
    routes.rtt[far.endpoint] = 0.0005  # now far: 8.5 ms
    assert route(routes, by_block(near, far)) == ["far"]


def test_an_unmeasured_peer_costs_the_default_round_trip():
    a = peer("a", 0, 30)
    routes = RouteFinder(MODEL_ID, 30)
    assert routes.hop_cost(a, 0, 30) == pytest.approx(DEFAULT_HOP_SECONDS + 0.01)
    routes.rtt[a.endpoint] = 0.05
    assert routes.hop_cost(a, 0, 30) == pytest.approx(0.06)


def test_banned_and_non_online_peers_are_not_routed():
    a, b = peer("a", 0, 30), peer("b", 0, 30)
    joining = peer("c", 0, 30).model_copy(update={"state": PeerState.joining})
    routes = RouteFinder(MODEL_ID, 30)
    routes.rtt[b.endpoint] = 1.0  # b is worse: a is the choice, until banned
    assert route(routes, by_block(a, b, joining)) == ["a"]
    routes.ban("a")
    assert route(routes, by_block(a, b, joining)) == ["b"]
    routes.ban("b")
    with pytest.raises(MissingBlocksError, match="0-29"):
        routes.find_chain(by_block(a, b, joining))


def test_spans_that_do_not_line_up_are_named():
    with pytest.raises(MissingBlocksError, match="blocks 15-29"):
        RouteFinder(MODEL_ID, 30).find_chain(by_block(peer("a", 0, 15), peer("b", 10, 30)))


# --- training: spread over replicas -----------------------------------------------------------


def draws(routes: RouteFinder, records, n: int = 3000) -> Counter:
    return Counter(tuple(route(routes, records, randomize=True)) for _ in range(n))


def test_training_spreads_over_replicas_in_proportion_to_their_speed():
    fast, slow = peer("fast", 10, 20, throughput=200.0), peer("slow", 10, 20, throughput=100.0)
    records = by_block(peer("head", 0, 10), fast, slow, peer("tail", 20, 30))
    routes = RouteFinder(MODEL_ID, 30, rng=random.Random(0))
    for p in (fast, slow):
        routes.rtt[p.endpoint] = 0.0  # compute only: 5 ms vs 10 ms
    counts = draws(routes, records)
    share = counts[("head", "fast", "tail")] / sum(counts.values())
    assert set(counts) == {("head", "fast", "tail"), ("head", "slow", "tail")}
    assert share == pytest.approx(2 / 3, abs=0.04)


def test_training_never_draws_a_replica_far_slower_than_the_best():
    near, far = peer("near", 0, 30), peer("far", 0, 30)
    routes = RouteFinder(MODEL_ID, 30, rng=random.Random(0))
    routes.rtt[near.endpoint], routes.rtt[far.endpoint] = 0.0, 0.2  # far: 21x slower per step
    assert draws(routes, by_block(near, far), n=500) == Counter({("near",): 500})


def test_inference_is_deterministic_and_training_draws_follow_the_seed():
    records = by_block(peer("a", 0, 10), peer("b", 0, 10), peer("c", 10, 30), peer("d", 10, 30))
    # Inference: the cheapest chain, whatever the rng has drawn before (ties included: equal costs).
    routes = RouteFinder(MODEL_ID, 30, rng=random.Random(0))
    first = route(routes, records)
    for _ in range(20):
        route(routes, records, randomize=True)
        assert route(routes, records) == first
    # Training: the draws are the seed's, the same for the same seed and not for another one.
    runs = {seed: [tuple(route(finder, records, randomize=True)) for _ in range(40)]
            for seed, finder in ((s, RouteFinder(MODEL_ID, 30, rng=random.Random(s))) for s in (1, 2))}
    again = RouteFinder(MODEL_ID, 30, rng=random.Random(1))
    assert [tuple(route(again, records, randomize=True)) for _ in range(40)] == runs[1]
    assert runs[1] != runs[2] and len(set(runs[1])) == 4, "four equally good chains, all drawn"


# --- measuring round trips ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rtts_are_measured_in_parallel_once_and_again_after_expiry():
    clock = Clock()
    table = RttTable(ttl=60.0, clock=clock)
    endpoints = [f"127.0.0.1:{port}" for port in range(3000, 3005)]
    together = threading.Barrier(len(endpoints), timeout=10)  # passes only if all pings run at once
    pinged = []

    def ping(endpoint: str, timeout: float) -> float:
        pinged.append(endpoint)
        together.wait()
        return 0.001 * (int(endpoint[-1]) + 1)

    assert table.measure(endpoints + endpoints[:2], ping) == []
    assert sorted(pinged) == endpoints and table[endpoints[4]] == pytest.approx(0.005)
    assert table.measure(endpoints, ping) == [] and len(pinged) == 5  # fresh: not pinged again
    clock.now = 61.0
    together.reset()
    table.measure(endpoints, ping)
    assert len(pinged) == 10


def test_a_peer_that_does_not_answer_is_reported_and_then_banned():
    good, dead = peer("good", 0, 30, port=4001), peer("dead", 0, 30, port=4002)

    def ping(endpoint: str, timeout: float) -> float:
        if endpoint == dead.endpoint:
            raise ConnectionError("refused")
        return 0.002

    assert RttTable().measure([good.endpoint, dead.endpoint], ping) == [dead.endpoint]


def test_remote_swarm_pings_candidates_before_routing_and_avoids_dead_ones(monkeypatch):
    dead = peer("dead", 10, 30, throughput=1000.0, port=4002)  # the best choice, were it alive
    good, elsewhere = peer("good", 10, 30, port=4001), peer("elsewhere", 0, 10, port=4003)
    pinged = []

    def ping(endpoint: str, timeout: float) -> float:
        pinged.append(endpoint)
        if endpoint == dead.endpoint:
            raise ConnectionError("refused")
        return 0.002

    monkeypatch.setattr(remote_swarm, "ping", ping)
    swarm = RemoteSwarm([], MODEL_ID, 30, dht=FlagsDHT())
    swarm.records = lambda refresh=False: by_block(dead, good, elsewhere)  # no DHT call: records are given
    chosen = []
    find = swarm.routes.find_chain

    def find_chain(records, start=0, end=None, randomize=False):
        chosen.append(list(pinged))  # what was pinged by the time the route is chosen
        return find(records, start, end, randomize)

    monkeypatch.setattr(swarm.routes, "find_chain", find_chain)
    assert [hop.peer.peer_id for hop in swarm.find_chain(10, 30)] == ["good"]
    assert chosen == [pinged] and sorted(pinged) == sorted([dead.endpoint, good.endpoint]), \
        "both candidates pinged before the route was chosen; `elsewhere` serves no part of 10:30"
    assert swarm.routes.rtt[good.endpoint] == 0.002


# --- a client that requires full precision --------------------------------------------------------------


def record(name: str, start: int, end: int, quant: str = "none") -> PeerRecord:
    return peer(name, start, end).model_copy(update={"quant": quant})


def test_routes_avoid_quantized_peers_when_asked():
    peers = [record("full-a", 0, 2), record("q", 2, 4, quant="int8"), record("full-bb", 2, 4)]
    records = by_block(*peers, num_blocks=4)
    strict = RouteFinder(MODEL_ID, 4, allow_quantized=False)
    assert [hop.peer.peer_id for hop in strict.find_chain(records)] == ["full-a", "full-bb"]
    only_quantized = {i: [p for p in rs if p.peer_id != "full-bb"] for i, rs in records.items()}
    with pytest.raises(MissingBlocksError, match="blocks 2-3 are served only by quantized peers") as error:
        strict.find_chain(only_quantized)
    assert error.value.missing == [2, 3]
    assert [hop.peer.peer_id for hop in RouteFinder(MODEL_ID, 4).find_chain(only_quantized)] == ["full-a", "q"]


def test_a_peer_other_clients_flagged_costs_more_and_exclude_and_quant_narrow_the_choice():
    finder = RouteFinder(MODEL_ID, 30)
    fast, slow = peer("fast", 0, 30, throughput=300.0), peer("slow", 0, 30, throughput=100.0)
    records = by_block(fast, slow)
    assert finder.find_chain(records)[0].peer.peer_id == "fast"
    assert finder.find_chain(records, exclude=frozenset({"fast"}))[0].peer.peer_id == "slow"
    with pytest.raises(MissingBlocksError):
        finder.find_chain(records, quant="int8")
    finder.flags = {"fast": 3}  # cost x4: now slower than `slow`
    assert finder.find_chain(records)[0].peer.peer_id == "slow"
