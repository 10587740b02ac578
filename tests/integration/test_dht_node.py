"""`python -m swarm.dht_node` as a real process, joined by in-process hivemind DHTs on 127.0.0.1."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time

from swarm import registry
from swarm.registry import ModelRecord, PeerRecord, block_key
from tests.procs import group_members, output, running, wait_for_line

pytestmark = pytest.mark.integration

NUM_BLOCKS = 30
MODEL = ModelRecord(model_name="smollm2-135m-instruct", num_blocks=NUM_BLOCKS, config_fingerprint="1a2b3c4d5e6f",
                    version="0.1.0")


def wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written in {timeout} s"
        time.sleep(0.05)
    return path.read_text()


def join(maddr: str) -> hivemind.DHT:
    return hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[maddr])


def peer_record(dht: hivemind.DHT, start: int, end: int, port: int) -> PeerRecord:
    return PeerRecord(model_id=MODEL.model_id, peer_id=dht.peer_id.to_base58(), endpoint=f"127.0.0.1:{port}",
                      start=start, end=end, state="online", throughput=100.0, cache_tokens_free=8192,
                      dtype="float32", version="0.1.0", fingerprint=f"weights-{start}-{end}")


@pytest.mark.compat
def test_dht_node_serves_records_and_stops_cleanly(tmp_path):
    maddr_file = tmp_path / "maddrs.txt"
    args = ["python", "-m", "swarm.dht_node", "--host", "127.0.0.1", "--maddr-file", str(maddr_file)]
    dhts: list[hivemind.DHT] = []
    with running(args, log_dir=tmp_path) as node:
        printed = wait_for_line(node, r"^/ip4/", timeout=30).string
        maddrs = wait_for_file(maddr_file, timeout=5).splitlines()
        assert maddrs[0] == printed and maddrs[0].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in maddrs[0]
        try:
            dhts = [join(maddrs[0]) for _ in range(3)]
            first, second, reader = dhts
            a, b = peer_record(first, 0, 15, 31331), peer_record(second, 15, 30, 31332)
            expiration = get_dht_time() + 30
            assert registry.announce(first, a, expiration)
            assert registry.announce(second, b, expiration)
            assert registry.announce_model(first, MODEL, expiration)
            # Junk anyone could write: a wrong record and a non-record under one block key.
            assert first.store(block_key(MODEL.model_id, 3), {"endpoint": "nowhere"}, expiration, subkey="junk")
            assert first.store(block_key(MODEL.model_id, 4), peer_record(second, 0, 30, 1).model_dump(mode="json"),
                               expiration, subkey="impostor")

            records = registry.fetch_span_records(reader, MODEL.model_id, NUM_BLOCKS)
            assert records == {i: [a] if i < 15 else [b] for i in range(NUM_BLOCKS)}
            assert registry.peers_by_id(records) == {a.peer_id: a, b.peer_id: b}
            assert registry.fetch_model(reader, MODEL.model_id) == MODEL
            assert registry.fetch_model(reader, "unknown-model-12345678") is None

            assert registry.withdraw(first, a, expiration + 1)
            records = registry.fetch_span_records(reader, MODEL.model_id, NUM_BLOCKS)
            assert records == {i: [] if i < 15 else [b] for i in range(NUM_BLOCKS)}
        finally:
            for dht in dhts:
                dht.shutdown()

        node.send_signal(signal.SIGTERM)  # the leader only: its own handler must take the DHT down
        assert node.wait(timeout=10) == 0, output(node)
        deadline = time.monotonic() + 5
        while group_members(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(node) == [], f"left behind: {group_members(node)}\n{output(node)}"


def test_help_and_bad_host():
    with running(["python", "-m", "swarm.dht_node", "--help"]) as proc:
        assert proc.wait(timeout=20) == 0
        assert "--initial-peers" in Path(proc.stdout_path).read_text()
    with running(["python", "-m", "swarm.dht_node", "--host", "not-an-ip"]) as proc:
        assert proc.wait(timeout=20) == 2
        assert "not an IP address" in Path(proc.stderr_path).read_text()
