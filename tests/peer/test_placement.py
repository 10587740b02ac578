"""peer.placement decisions over fake records, and peer.balancer's protocol run by several
peers at once against an in-memory stand-in for the DHT (the real one: tests/integration/
test_swarm_placement.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from peer import balancer as balancer_module
from peer.balancer import Balancer
from peer.placement import (
    better_span,
    choose_span,
    departed,
    others_while_draining,
    others_while_joining,
    settled,
    strength,
    yields_to_draining,
)
from swarm import cli
from swarm.registry import ModelRecord, PeerRecord, PeerState

MODEL = ModelRecord(model_name="m", num_blocks=30, config_fingerprint="ab12cd34", version="0")


def peer(name: str, start: int, end: int, throughput: float = 10.0, state: PeerState = PeerState.online) -> PeerRecord:
    return PeerRecord(model_id=MODEL.model_id, peer_id=name, endpoint=f"127.0.0.1:{1000 + ord(name[0])}",
                      start=start, end=end, state=state, throughput=throughput, cache_tokens_free=0,
                      dtype="float32", version="0", fingerprint="")


# --- choosing a span ---------------------------------------------------------------------


def test_an_empty_swarm_is_filled_from_block_0_one_peer_after_another():
    records = []
    for name in "abc":
        start, end = choose_span(records, 30, 10, throughput=10.0)
        records.append(peer(name, start, end))
    assert [(r.start, r.end) for r in records] == [(0, 10), (10, 20), (20, 30)]


def test_uncovered_blocks_come_before_any_throughput():
    records = [peer("a", 0, 10, throughput=1.0), peer("b", 10, 20, throughput=1000.0)]
    assert choose_span(records, 30, 10, throughput=10.0) == (20, 30)


def test_the_weakest_span_is_reinforced_and_ties_go_to_the_lowest_start():
    records = [peer("a", 0, 10, 20.0), peer("b", 10, 20, 5.0), peer("c", 20, 30, 20.0)]
    assert choose_span(records, 30, 10, throughput=10.0) == (10, 20)
    even = [peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30)]
    assert choose_span(even, 30, 10, throughput=10.0) == (0, 10)


def test_among_windows_lifting_the_minimum_the_next_weakest_decides():
    # Blocks 0-4 and 12-14 are weakest (5); no window of 10 covers both, so the minimum stays
    # 5 whatever we do: the window that lifts the *most* weak blocks wins, not block 0.
    records = [peer("a", 0, 5, 5.0), peer("b", 5, 12, 9.0), peer("c", 12, 22, 5.0), peer("d", 22, 30, 9.0)]
    assert choose_span(records, 30, 10, throughput=10.0) == (12, 22)


def test_a_joining_peer_counts_as_a_typical_one_not_as_zero():
    # c announced 0 (not measured yet); were that taken at face value, 20:30 would look weakest.
    records = [peer("a", 0, 10, 20.0), peer("b", 10, 20, 20.0), peer("c", 20, 30, 0.0, PeerState.joining)]
    assert choose_span(records, 30, 10, throughput=20.0) == (0, 10)


def test_draining_peers_and_the_peer_itself_do_not_count():
    records = [peer("a", 0, 10, state=PeerState.draining), peer("me", 10, 20), peer("b", 20, 30)]
    assert choose_span(records, 30, 10, throughput=10.0, exclude="me") == (0, 10)


def test_span_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="1..30"):
        choose_span([], 30, 31, throughput=1.0)


def test_strength_counts_uncovered_blocks_and_sums_throughput():
    s = strength([peer("a", 0, 2, 3.0), peer("b", 1, 3, 4.0)], 4)
    assert s.throughput == (3.0, 7.0, 4.0, 0.0) and s.uncovered == 1 and s.weakest == 0.0


# --- moving --------------------------------------------------------------------------------


def test_a_replica_moves_into_a_gap():
    records = [peer("a", 0, 10), peer("me", 0, 10), peer("b", 10, 20)]  # 20:30 lost its peer
    assert better_span(records, 30, (0, 10), 10.0, exclude="me") == (20, 30)


def test_the_only_peer_of_a_span_never_moves_even_to_a_gap():
    records = [peer("me", 0, 10), peer("b", 10, 20)]
    assert better_span(records, 30, (0, 10), 10.0, exclude="me") is None


@pytest.mark.parametrize("weak, moves", [(10.0, True), (14.0, True), (17.0, False), (20.0, False)])
def test_a_move_must_lift_the_weakest_point_by_the_margin(weak, moves):
    # me (10 tok/s) doubles a on 0:10; c on 20:30 has `weak`. Moving makes 0:10 the weakest
    # (20) and 20:30 weak + 10: worth it only if 20 beats `weak` by 20 %.
    records = [peer("a", 0, 10, 20.0), peer("me", 0, 10, 10.0), peer("b", 10, 20, 40.0), peer("c", 20, 30, weak)]
    assert better_span(records, 30, (0, 10), 10.0, exclude="me") == ((20, 30) if moves else None)


def test_a_balanced_swarm_stays_put():
    records = [peer("a", 0, 10), peer("me", 0, 10), peer("b", 10, 20), peer("c", 10, 20), peer("d", 20, 30)]
    # 20:30 is weakest (10 vs 20), but moving there leaves 0:10 at 10: no gain.
    assert better_span(records, 30, (0, 10), 10.0, exclude="me") is None


def test_a_swarm_with_someone_joining_or_draining_is_not_settled():
    online = [peer("a", 0, 10), peer("me", 10, 20, state=PeerState.draining)]
    assert settled(online, "me")
    assert not settled(online + [peer("b", 20, 30, state=PeerState.joining)], "me")
    assert not settled(online + [peer("b", 20, 30, state=PeerState.draining)], "me")


def test_concurrent_claims_and_departures_are_ordered_by_peer_id():
    a, b = peer("a", 0, 10, state=PeerState.joining), peer("b", 5, 15, state=PeerState.joining)
    c = peer("c", 20, 30, state=PeerState.joining)
    # b counts a's claim (a goes first); a does not count b's (b will choose again), but c's.
    assert others_while_joining(b, [a, b, c]) == [a, c] and others_while_joining(a, [a, b, c]) == [c]
    da, db = (r.model_copy(update={"state": PeerState.draining}) for r in (a, b))
    assert yields_to_draining(db, [da, db]) and not yields_to_draining(da, [da, db])
    # a re-checks counting b as staying: b yields to a, so b is back online soon.
    assert [(r.peer_id, r.state) for r in others_while_draining(da, [da, db])] == [("b", PeerState.online)]
    assert others_while_draining(db, [da, db]) == []


def test_departed_is_what_the_new_span_does_not_cover():
    assert departed((0, 10), (20, 30)) == [(0, 10)]
    assert departed((0, 10), (5, 15)) == [(0, 5)]
    assert departed((10, 20), (5, 15)) == [(15, 20)]
    assert departed((0, 30), (10, 20)) == [(0, 10), (20, 30)]
    assert departed((0, 10), (0, 10)) == []


# --- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    ([], "one of the arguments --blocks --num-blocks is required"),
    (["--blocks", "0:10", "--num-blocks", "10"], "not allowed with argument --blocks"),
    (["--num-blocks", "0"], "must be > 0"),
    (["--num-blocks", "10", "--balance-period", "-1"], "must be >= 0"),
])
def test_span_or_num_blocks_exactly_one(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        cli.main(["peer", *argv])
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_num_blocks_beyond_the_model_names_its_size(capsys):
    assert cli.main(["peer", "--num-blocks", "31"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-blocks 31" in err and "has 30 blocks" in err


# --- the protocol, several peers at once ------------------------------------------------------


class FakeDHT:
    """Peer id -> latest record; every read and write yields to the event loop."""

    def __init__(self) -> None:
        self.records: dict[str, PeerRecord] = {}


class FakeHost:
    """What Balancer uses of peer.span_host.SpanHost, over a FakeDHT."""

    def __init__(self, dht: FakeDHT, name: str, throughput: float = 10.0) -> None:
        self.dht, self.peer_id, self.model = dht, name, MODEL
        self.start, self.end, self.state = 0, 1, PeerState.joining
        self.throughput = throughput
        self.moves: list[tuple[int, int]] = []

    def record(self) -> PeerRecord:
        return peer(self.peer_id, self.start, self.end, self.throughput, self.state)

    async def fetch_records(self) -> list[PeerRecord]:
        await asyncio.sleep(0)
        return list(self.dht.records.values())

    async def announce(self, state, start=None, end=None) -> bool:
        if start is not None:
            self.start, self.end = start, end
        self.state = state
        await asyncio.sleep(0)
        self.dht.records[self.peer_id] = self.record()
        return True

    async def drain(self) -> None:
        await self.announce(PeerState.draining)

    async def undrain(self) -> None:
        await self.announce(PeerState.online)

    async def move(self, start: int, end: int, stop) -> bool:
        self.moves.append((start, end))
        await self.announce(PeerState.online, start, end)
        return True


@pytest.fixture
def quick_settle(monkeypatch):
    monkeypatch.setattr(balancer_module, "SETTLE_SECONDS", (0.01, 0.03))


@pytest.mark.parametrize("seed", range(5))
def test_peers_starting_together_end_up_on_disjoint_spans(quick_settle, seed):
    random.seed(seed)
    dht = FakeDHT()
    hosts = [FakeHost(dht, name) for name in ("p3", "p1", "p4", "p2")]

    async def start_all():
        stop = asyncio.Event()
        assert all(await asyncio.gather(*(Balancer(h, 10, 0).place(stop) for h in hosts)))

    asyncio.run(start_all())
    spans = sorted((h.start, h.end) for h in hosts)
    # All four read an empty swarm and chose 0:10; now three hold distinct spans, and the
    # fourth doubles one of them.
    assert {(0, 10), (10, 20), (20, 30)} == set(spans)


def test_a_claim_made_before_seeing_a_peer_already_there_is_made_again(quick_settle):
    dht = FakeDHT()
    late = FakeHost(dht, "z")
    fetches = []
    real_fetch = late.fetch_records

    async def fetch_records():
        fetches.append(1)
        if len(fetches) == 1:  # "z" read the swarm before "a" (online on 0:10) was visible
            return []
        dht.records["a"] = peer("a", 0, 10)
        return await real_fetch()

    late.fetch_records = fetch_records
    assert asyncio.run(Balancer(late, 10, 0).place(asyncio.Event()))
    assert (late.start, late.end) == (10, 20)


def test_of_two_replicas_deciding_at_once_only_one_moves_into_a_gap(quick_settle):
    dht = FakeDHT()
    hosts = {name: FakeHost(dht, name) for name in ("r1", "r2", "b")}
    for name, span in (("r1", (0, 10)), ("r2", (0, 10)), ("b", (10, 20))):  # 20:30 lost its peer
        hosts[name].start, hosts[name].end, hosts[name].state = *span, PeerState.online
        dht.records[name] = hosts[name].record()

    async def decide_together():
        stop = asyncio.Event()
        return await asyncio.gather(*(Balancer(hosts[n], 10, 1).decide(stop)
                                      for n in ("r1", "r2")))

    assert asyncio.run(decide_together()) == [(20, 30), None]  # r1 (smaller id) goes
    assert dht.records["r2"].state == PeerState.online  # r2 took back its announcement


def test_rebalancing_moves_and_reports(quick_settle):
    dht = FakeDHT()
    me, other = FakeHost(dht, "me"), FakeHost(dht, "other")
    for host in (me, other):
        host.start, host.end, host.state = 0, 10, PeerState.online
        dht.records[host.peer_id] = host.record()
    lines = []

    async def run():
        stop = asyncio.Event()
        task = asyncio.ensure_future(Balancer(me, 10, 0.01).rebalance_until(stop, lines.append))
        while not me.moves:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(asyncio.wait_for(run(), timeout=10))
    assert me.moves == [(10, 20)] and lines == ["peer moved: blocks 0:10 -> 10:20"]
