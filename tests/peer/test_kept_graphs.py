"""peer/kept_graphs.py: what a peer keeps between a Forward and its Backward stays bounded in
bytes and in time, and is handed out once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peer.kept_graphs import KeptGraphs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def graph(nbytes: int) -> SimpleNamespace:
    return SimpleNamespace(nbytes=nbytes)  # the store only reads the size


def test_a_graph_is_taken_once():
    kept = KeptGraphs(max_bytes=100)
    g = graph(40)
    assert kept.put("a", g) and kept.nbytes == 40
    assert kept.take("a") is g
    assert kept.take("a") is None and kept.nbytes == 0 and len(kept) == 0


def test_oldest_graphs_make_room_and_an_oversized_one_is_not_kept():
    kept = KeptGraphs(max_bytes=100)
    for name in "abc":
        kept.put(name, graph(40))
    assert (len(kept), kept.nbytes) == (2, 80)
    assert kept.take("a") is None and kept.take("b") is not None
    assert not kept.put("huge", graph(101)) and kept.take("huge") is None
    assert kept.nbytes == 40


def test_graphs_expire_after_the_ttl():
    clock = Clock()
    kept = KeptGraphs(max_bytes=100, ttl=10, clock=clock)
    kept.put("old", graph(10))
    clock.now = 6
    kept.put("new", graph(10))
    clock.now = 10.5
    assert kept.take("old") is None and kept.nbytes == 10
    assert kept.take("new") is not None


def test_an_id_sent_twice_keeps_the_newer_graph():
    kept = KeptGraphs(max_bytes=100)
    first, second = graph(30), graph(20)
    kept.put("a", first)
    kept.put("a", second)
    assert kept.nbytes == 20 and kept.take("a") is second


def test_zero_bytes_keeps_nothing_and_bad_settings_are_refused():
    assert not KeptGraphs(max_bytes=0).put("a", graph(1))
    with pytest.raises(ValueError):
        KeptGraphs(max_bytes=-1)
    with pytest.raises(ValueError):
        KeptGraphs(max_bytes=10, ttl=0)
