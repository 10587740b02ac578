"""Unit tests for swarm.dashboard: coverage and gaps, the load history, a snapshot read through
an in-memory DHT, and the page served over real HTTP (tests/integration/test_dashboard.py
drives it in a browser against a real swarm)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from hivemind.utils import get_dht_time

from swarm import registry
from swarm.dashboard.coverage import gaps, model_view
from swarm.dashboard.history import ModelHistory
from swarm.dashboard.watch import SwarmWatch
from swarm.registry import ModelRecord, PeerRecord
from tests.swarm.test_registry import FakeDHT, peer_dict

MODEL = ModelRecord(model_name="SmolLM2-135M-Instruct", num_blocks=6, config_fingerprint="1a2b3c4d", version="1")


def record(peer_id: str, start: int, end: int, **fields) -> PeerRecord:
    return PeerRecord(**peer_dict(model_id=MODEL.model_id, peer_id=peer_id, start=start, end=end, **fields))


def by_block(*records: PeerRecord) -> dict[int, list[PeerRecord]]:
    return {i: [r for r in records if i in r.span] for i in range(MODEL.num_blocks)}


def test_gaps_are_runs_of_blocks_without_replicas():
    assert gaps([2, 0, 0, 1, 0]) == [[1, 3], [4, 5]]
    assert gaps([1, 1]) == [] and gaps([0, 0]) == [[0, 2]]


def test_model_view_counts_online_replicas_only():
    a, b = record("A", 0, 3), record("B", 2, 4, endpoint="127.0.0.1:2")
    joining = record("C", 4, 6, state="joining", relays=[
        "/ip4/198.51.100.1/tcp/31337/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWPeer"])
    view = model_view(MODEL, by_block(b, a, joining))
    assert [block["replicas"] for block in view["blocks"]] == [1, 1, 2, 1, 0, 0]
    assert view["blocks"][2]["peers"] == ["A", "B"] and view["blocks"][4]["peers"] == ["C"]
    assert view["covered"] == 4 and view["gaps"] == [[4, 6]]
    assert [p["peer_id"] for p in view["peers"]] == ["A", "B", "C"]
    assert [p["reach"] for p in view["peers"]] == ["direct", "direct", "relayed"]
    assert {"endpoint", "throughput", "cache_tokens_free", "dtype", "quant", "version", "sessions"} <= set(view["peers"][0])
    json.dumps(view)


def test_history_counts_sessions_at_the_busiest_block_and_tokens_through_the_whole_model():
    history = ModelHistory(period=2.0, seconds=10.0)
    history.add(6, by_block(record("A", 0, 3, tokens_served=100), record("B", 3, 6)), now=0.0)
    history.add(6, by_block(record("A", 0, 3, tokens_served=160, sessions=2), record("B", 3, 6, tokens_served=60,
                                                                                       sessions=1)), now=2.0)
    # A's 60 tokens did half of the model's work, B's 60 the other half; B's first 60 were new.
    assert history.view() == [[0.0, 0, 0.0], [2.0, 2, 60.0]]
    history.add(6, by_block(record("A", 0, 3, tokens_served=10)), now=4.0)  # A restarted: counted from zero
    assert history.view()[-1] == [4.0, 0, 65.0]
    for t in range(6, 30, 2):
        history.add(6, by_block(), now=float(t))
    assert len(history.view()) == 6  # 10 s of 2 s samples


def test_a_snapshot_lists_every_model_of_the_index_with_its_records():
    dht = FakeDHT()
    other = ModelRecord(model_name="other", num_blocks=2, config_fingerprint="99887766", version="1")
    now = get_dht_time()
    registry.announce_model(dht, MODEL, now + 30)
    registry.announce_model(dht, other, now + 30)
    registry.announce(dht, record("A", 0, 4), now + 30)
    watch = SwarmWatch(dht)
    snapshot = watch.sample(now=1000.0)
    assert snapshot is watch.snapshot() and snapshot["error"] is None
    assert [m["model_id"] for m in snapshot["models"]] == sorted([MODEL.model_id, other.model_id])
    smol = next(m for m in snapshot["models"] if m["model_id"] == MODEL.model_id)
    assert smol["covered"] == 4 and smol["gaps"] == [[4, 6]] and smol["history"] == [[1000.0, 0, 0.0]]
    # The last peer gone and the index expired: the model stays on show, every block a gap.
    dht.node.data.clear()
    smol = next(m for m in watch.sample(now=1002.0)["models"] if m["model_id"] == MODEL.model_id)
    assert smol["covered"] == 0 and smol["gaps"] == [[0, 6]] and len(smol["history"]) == 2


def test_the_page_script_and_snapshot_are_served_over_http():
    pytest.importorskip("uvicorn")
    from swarm.dashboard import DashboardServer

    dht = FakeDHT()
    registry.announce_model(dht, MODEL, get_dht_time() + 30)
    server = DashboardServer(dht, "127.0.0.1", 0)
    try:
        def get(path: str) -> tuple[str, str]:
            with urllib.request.urlopen(server.url + path, timeout=10) as response:
                return response.headers["content-type"], response.read().decode()

        kind, page = get("")
        assert kind.startswith("text/html") and '<script src="dashboard.js">' in page
        kind, script = get("dashboard.js")
        assert kind.startswith("text/javascript") and "v1/chat/completions" in script
        for _ in range(50):
            kind, body = get("swarm.json")
            snapshot = json.loads(body)
            if snapshot["models"]:
                break
            time.sleep(0.1)
        assert snapshot["models"][0]["gaps"] == [[0, 6]]
        assert snapshot["chat"]["enabled"] is False and "swarm api" in snapshot["chat"]["reason"]
    finally:
        server.stop()
