"""Unit tests for swarm.registry: record validation, keys, and reading junk without a network.

The DHT here is an in-memory stand-in that runs registry's coroutines against a fake node;
tests/integration/test_dht_node.py does the same against a real hivemind DHT.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from pydantic import ValidationError

from swarm import registry
from swarm.registry import ModelRecord, PeerRecord, PeerState, block_key, make_model_id, model_key

MODEL_ID = "smollm2-135m-instruct-1a2b3c4d"


def peer_dict(**overrides: Any) -> dict[str, Any]:
    record = dict(model_id=MODEL_ID, peer_id="peerA", endpoint="127.0.0.1:31330", start=0, end=15,
                  state="online", throughput=123.5, cache_tokens_free=4096, dtype="float32",
                  version="0.1.0", fingerprint="f00d")
    record.update(overrides)
    return record


# --- records ------------------------------------------------------------------------


def test_peer_record_round_trips_through_msgpack():
    record = PeerRecord(**peer_dict())
    dumped = record.model_dump(mode="json")
    assert dumped["state"] == "online" and dumped["quant"] == "none"
    assert PeerRecord.model_validate(MSGPackSerializer.loads(MSGPackSerializer.dumps(dumped))) == record
    assert record.span == range(0, 15)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:1", "[::1]:8080", "peer-3.example.org:443", "localhost:65535"])
def test_valid_endpoints(endpoint):
    assert PeerRecord(**peer_dict(endpoint=endpoint)).endpoint == endpoint


@pytest.mark.parametrize(
    "overrides",
    [
        dict(endpoint="127.0.0.1"),  # no port
        dict(endpoint="127.0.0.1:0"),
        dict(endpoint="127.0.0.1:70000"),
        dict(endpoint=":8080"),
        dict(endpoint="::1:8080"),  # unbracketed IPv6
        dict(endpoint="0.0.0.0:8080"),  # not dialable
        dict(endpoint="[::]:8080"),
        dict(endpoint="bad host:8080"),
        dict(start=-1),
        dict(start=5, end=5),
        dict(start=6, end=5),
        dict(state="offline"),
        dict(throughput=-1.0),
        dict(throughput=float("nan")),
        dict(throughput=float("inf")),
        dict(cache_tokens_free=-1),
        dict(dtype="int8"),
        dict(peer_id=""),
        dict(model_id="Has Spaces"),
        dict(version="x" * 1000),
        dict(start="zero"),
    ],
)
def test_invalid_peer_records_are_rejected(overrides):
    with pytest.raises(ValidationError):
        PeerRecord(**peer_dict(**overrides))


def test_unknown_fields_are_ignored_for_forward_compatibility():
    record = PeerRecord.model_validate(peer_dict(added_in_v2="hello"))
    assert "added_in_v2" not in record.model_dump()


def test_states():
    assert {s.value for s in PeerState} == {"joining", "online", "draining"}


def test_model_record():
    record = ModelRecord(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", num_blocks=30,
                         config_fingerprint="1A2B3C4D5E6F", version="0.1.0")
    assert record.model_id == "smollm2-135m-instruct-1a2b3c4d"
    for bad in [dict(num_blocks=0), dict(config_fingerprint="xyz12345"), dict(config_fingerprint="abc"),
                dict(model_name="")]:
        with pytest.raises(ValidationError):
            ModelRecord(**{**record.model_dump(), **bad})


# --- keys ---------------------------------------------------------------------------


def test_keys():
    assert block_key(MODEL_ID, 7) == f"{MODEL_ID}.block.7"
    assert model_key(MODEL_ID) == f"{MODEL_ID}.model"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct-abcdef01"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct-abcdef01"),
        ("/home/me/models/SmolLM2-135M-Instruct/", "smollm2-135m-instruct-abcdef01"),
        ("C:\\models\\Qwen2.5 0.5B", "qwen2.5-0.5b-abcdef01"),
        ("weird name!!with@chars", "weird-name-with-chars-abcdef01"),
        ("///", "model-abcdef01"),
    ],
)
def test_make_model_id_sanitises(name, expected):
    model_id = make_model_id(name, "ABCDEF0123456789")
    assert model_id == expected
    PeerRecord(**peer_dict(model_id=model_id))  # always a valid model_id


def test_make_model_id_rejects_non_hex_fingerprint():
    with pytest.raises(ValueError, match="hex digest"):
        make_model_id("m", "not-hex!")
    with pytest.raises(ValueError):
        make_model_id("m", "abc")


def test_make_model_id_truncates_long_names():
    assert len(make_model_id("x" * 500, "abcdef01")) <= 80


# --- reading untrusted values -------------------------------------------------------


class FakeNode:
    """Just enough of hivemind.DHTNode: store_many / get_many over an in-memory dict of subkey dicts."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    async def store_many(self, keys, values, expiration_time, subkeys):
        result = {}
        for key, value, subkey in zip(keys, values, subkeys):
            slot = self.data.setdefault(key, {})
            old = slot.get(subkey)
            ok = old is None or old.expiration_time < expiration_time  # hivemind keeps the newer value
            if ok:
                slot[subkey] = ValueWithExpiration(MSGPackSerializer.loads(MSGPackSerializer.dumps(value)),
                                                   expiration_time)
            result[(key, subkey)] = ok
        return result

    async def get_many(self, keys, sufficient_expiration_time=None):
        found = {}
        for key in keys:
            value = self.data.get(key)
            if value is None:
                found[key] = None
            elif isinstance(value, dict):
                found[key] = ValueWithExpiration(value, max(v.expiration_time for v in value.values()))
            else:
                found[key] = value
        return found


class FakeDHT:
    def __init__(self, peer_id: str = "announcer") -> None:
        self.node = FakeNode()
        self.calls = 0
        self.peer_id = SimpleNamespace(to_base58=lambda: peer_id)

    def run_coroutine(self, coro):
        self.calls += 1
        return asyncio.run(coro(self, self.node))


def test_announce_then_fetch_in_one_call_each():
    dht = FakeDHT()
    a = PeerRecord(**peer_dict(peer_id="A", start=0, end=3))
    b = PeerRecord(**peer_dict(peer_id="B", start=2, end=4, endpoint="127.0.0.1:2", state="draining"))
    now = get_dht_time()
    assert registry.announce(dht, a, now + 30) and registry.announce(dht, b, now + 30)
    assert dht.calls == 2  # one batched store per announcement, whatever the span length
    records = registry.fetch_span_records(dht, MODEL_ID, num_blocks=5)
    assert dht.calls == 3
    assert records == {0: [a], 1: [a], 2: [a, b], 3: [b], 4: []}
    assert registry.peers_by_id(records) == {"A": a, "B": b}
    assert registry.peers_by_id([a, b, a]) == {"A": a, "B": b}


def test_junk_is_skipped_never_raised():
    dht = FakeDHT()
    good = PeerRecord(**peer_dict(peer_id="A", start=0, end=2))
    now = get_dht_time()
    registry.announce(dht, good, now + 30)
    key0, key1 = block_key(MODEL_ID, 0), block_key(MODEL_ID, 1)
    junk = {
        "not-a-dict": "garbage",
        "bad-fields": {"peer_id": 5},
        "bad-span": peer_dict(peer_id="bad-span", start=3, end=1),
        "C": peer_dict(peer_id="someone-else"),  # subkey is not the record's peer
        "D": peer_dict(peer_id="D", model_id="other-model-12345678"),  # another model's record
        "E": peer_dict(peer_id="E", start=1, end=2),  # does not cover block 0
        "F": peer_dict(peer_id="F", start=0, end=99),  # beyond the model's blocks
        "G": peer_dict(peer_id="G", endpoint="127.0.0.1:9"),  # valid but expired
        "H": None,
        7: [1, 2, 3],
    }
    for subkey, value in junk.items():
        expiration = now - 1 if subkey == "G" else now + 30
        dht.node.data[key0][subkey] = ValueWithExpiration(value, expiration)
    dht.node.data[key1] = ValueWithExpiration(b"plain value without subkeys", now + 30)
    records = registry.fetch_span_records(dht, MODEL_ID, num_blocks=2)
    assert records == {0: [good], 1: []}


def test_withdraw_hides_the_record_but_needs_a_later_expiration():
    dht = FakeDHT()
    record = PeerRecord(**peer_dict(peer_id="A", start=0, end=2))
    now = get_dht_time()
    registry.announce(dht, record, now + 30)
    assert not registry.withdraw(dht, record, expiration=now + 10)  # older than the record: refused
    assert registry.fetch_span_records(dht, MODEL_ID, 2) == {0: [record], 1: [record]}
    assert registry.withdraw(dht, record, expiration=now + 31)
    assert registry.fetch_span_records(dht, MODEL_ID, 2) == {0: [], 1: []}
    registry.announce(dht, record, now + 60)  # a peer may come back under the same id
    assert registry.fetch_span_records(dht, MODEL_ID, 2) == {0: [record], 1: [record]}


def test_a_relayed_record_names_its_circuits_and_refuses_junk():
    from swarm.registry import PeerRecord

    base = dict(model_id="m-12345678", peer_id="p", endpoint="127.0.0.1:1", start=0, end=1, state="online",
                throughput=1.0, cache_tokens_free=1, dtype="float32", version="0", fingerprint="f")
    circuit = "/ip4/198.51.100.1/tcp/31337/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWPeer"
    record = PeerRecord(**base, relays=[circuit])
    assert record.relayed and record.relays == (circuit,)
    assert not PeerRecord(**base).relayed
    for junk in (["/ip4/198.51.100.1/tcp/1/p2p/R"], ["x" * 300], [circuit, circuit.replace("Peer", "Other")],
                 [circuit] * 5):
        with pytest.raises(ValueError):
            PeerRecord(**base, relays=junk)


def test_models_are_listed_in_an_index_and_junk_there_is_skipped():
    dht = FakeDHT()
    smol = ModelRecord(model_name="SmolLM2-135M-Instruct", num_blocks=30, config_fingerprint="1a2b3c4d", version="1")
    other = ModelRecord(model_name="gemma-3-270m", num_blocks=18, config_fingerprint="99887766", version="1")
    now = get_dht_time()
    assert registry.fetch_models(dht) == [] and dht.calls == 1
    assert registry.announce_model(dht, smol, now + 30) and registry.announce_model(dht, other, now + 30)
    assert dht.calls == 3  # the model's key and the index in one store each
    index = dht.node.data[registry.MODELS_KEY]
    index["liar-12345678"] = ValueWithExpiration(smol.model_dump(mode="json"), now + 30)  # not its subkey
    index["junk"] = ValueWithExpiration({"num_blocks": -1}, now + 30)
    index["old-12345678"] = ValueWithExpiration({**other.model_dump(mode="json"), "model_name": "old"}, now - 1)
    assert registry.fetch_models(dht) == [other, smol]  # sorted by model_id


def test_records_of_older_peers_have_no_load_counters():
    old = PeerRecord.model_validate(peer_dict())
    assert (old.sessions, old.tokens_served) == (0, 0)
    for bad in (dict(sessions=-1), dict(tokens_served=-5)):
        with pytest.raises(ValidationError):
            PeerRecord(**peer_dict(**bad))
