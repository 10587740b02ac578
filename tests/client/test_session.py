"""client.session: an inference session over fake peers (tests/client/fakes.py): what the
open and step messages say, steps through every hop in chain order, and a failed peer
rebuilt from the steps the client kept for it (real peers: tests/integration/test_client_sessions.py,
test_fault_tolerance.py). Push between peers: tests/client/test_push.py."""

from __future__ import annotations

import pytest
import torch

from client import session as session_module
from client.session import InferenceSession, SessionError
from swarm.wire import deserialize_tensor

from tests.client.fakes import FakePeers, hidden, peer, swarm_of


@pytest.fixture
def peers(monkeypatch) -> FakePeers:
    fake = FakePeers(supports_push=False)
    monkeypatch.setattr(session_module.PeerConnection, "to", fake.to)
    return fake


def three_hops(monkeypatch, **settings):
    return swarm_of(monkeypatch, peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30), **settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_open_declares_the_dtype_the_client_sends(monkeypatch, peers, dtype):
    """Peers refuse steps whose dtype differs from the one the session was opened for: a
    bfloat16 client must open its sessions as bfloat16."""
    with InferenceSession(three_hops(monkeypatch), max_length=8) as session:
        out = session.step(hidden(dtype=dtype))
    assert out.dtype == dtype
    opens = [streams[-1].open for streams in peers.streams.values()]
    assert [o.dtype for o in opens] == [str(dtype).removeprefix("torch.")] * 3
    assert {deserialize_tensor(peers.stream(e).received[0][1].hidden_states).dtype for e in peers.streams} == {dtype}


def test_open_names_each_hops_span_and_the_session(monkeypatch, peers):
    swarm = three_hops(monkeypatch, codec="float16")
    with InferenceSession(swarm, max_length=8) as session:
        session.step(hidden(batch=2))
    opens = [peers.stream(e).open for e in session.endpoints]
    assert [(o.start, o.end) for o in opens] == [(0, 10), (10, 20), (20, 30)]
    assert {(o.session_id, o.max_length, o.batch_size, o.response_codec, o.model_id) for o in opens} == {
        (session.session_id, 8, 2, "float16", swarm.model_id)}


def test_steps_run_every_hop_in_chain_order(monkeypatch, peers):
    with InferenceSession(three_hops(monkeypatch), max_length=8) as session:
        x = hidden()
        torch.testing.assert_close(session.step(x[:, :1]), x[:, :1] + 30)
        torch.testing.assert_close(session.step(x[:, 1:], attention_mask=torch.ones(1, 1)), x[:, 1:] + 30)
        assert session.position == 2 and session.steps == 2
    # Each hop got the previous hop's output, from the client; positions and masks go along.
    first, second = (peers.stream(e).received for e in session.endpoints[:2])
    assert [via for via, _ in first + second] == ["client"] * 4
    torch.testing.assert_close(deserialize_tensor(second[0][1].hidden_states), x[:, :1] + 10)
    assert [step.position for _, step in first] == [0, 1] and first[1][1].HasField("attention_mask")
    assert all(stream.closed for streams in peers.streams.values() for stream in streams)


def test_a_session_refuses_what_it_cannot_hold(monkeypatch, peers):
    with InferenceSession(three_hops(monkeypatch), max_length=2) as session:
        session.step(hidden(new=1))
        with pytest.raises(SessionError, match="batch 1, got batch 2"):
            session.step(hidden(batch=2, new=1))
        with pytest.raises(SessionError, match="max_length is 2"):
            session.step(hidden(new=2))
    with pytest.raises(SessionError, match="closed"):
        session.step(hidden(new=1))


def test_a_failed_peer_is_rebuilt_from_the_steps_it_was_sent(monkeypatch, peers):
    b, spare = peer("b", 10, 20), peer("spare", 10, 20, throughput=10.0)  # spare: the slower replica
    c = peer("c", 20, 30)
    swarm = swarm_of(monkeypatch, peer("a", 0, 10), b, spare, c)
    x = hidden(new=3)
    with InferenceSession(swarm, max_length=8) as session:
        session.step(x[:, :2])
        assert b.endpoint in session.endpoints
        peers.dead.add(b.endpoint)
        out = session.step(x[:, 2:])
        torch.testing.assert_close(out, x[:, 2:] + 30)
        assert spare.endpoint in session.endpoints and b.endpoint not in session.endpoints
    replayed = peers.stream(spare.endpoint).received
    # The spare got the first step replayed (the hidden states `b` got), then the new one.
    assert [step.step_id for _, step in replayed] == [1, 2]
    torch.testing.assert_close(deserialize_tensor(replayed[0][1].hidden_states), x[:, :2] + 10)
    assert len(peers.stream(c.endpoint).received) == 2, "the hop after it ran each step once"


def test_a_replacement_that_fails_to_open_is_one_more_failure_and_the_next_is_tried(monkeypatch, peers):
    """Rebuilding a failed hop can fail too (a relayed peer's tunnel half closed by its dead
    relay refuses the first reopen): that is another failure of the step, not the session's end."""
    b, first, second = peer("b", 10, 20), peer("first", 10, 20, throughput=50.0), peer("second", 10, 20, throughput=10.0)
    c = peer("c", 20, 30)
    swarm = swarm_of(monkeypatch, peer("a", 0, 10), b, first, second, c)
    x = hidden(new=3)
    with InferenceSession(swarm, max_length=8) as session:
        session.step(x[:, :2])
        assert b.endpoint in session.endpoints
        peers.dead.add(b.endpoint)
        peers.opens_fail.add(first.endpoint)
        out = session.step(x[:, 2:])
        torch.testing.assert_close(out, x[:, 2:] + 30)
        assert second.endpoint in session.endpoints
    assert first.endpoint in peers.opens_tried, "the failing replacement was tried first"
    assert [step.step_id for _, step in peers.stream(second.endpoint).received] == [1, 2]
    assert len(peers.stream(c.endpoint).received) == 2, "the hop after it ran each step once"


def test_positions_the_peers_would_derive_are_not_sent(monkeypatch, peers):
    """Without a padding mask so far, peers count positions from the step's position: ids that
    say the same are left out; other ids, and every id once a mask was sent, go along."""
    with InferenceSession(three_hops(monkeypatch), max_length=8) as session:
        session.step(hidden(batch=2, new=2), position_ids=torch.tensor([[0, 1], [0, 1]]))
        session.step(hidden(batch=2, new=1), position_ids=torch.tensor([[5], [2]]))
        mask = torch.tensor([[1], [0]])
        session.step(hidden(batch=2, new=1), attention_mask=mask, position_ids=torch.tensor([[3], [3]]))
        session.step(hidden(batch=2, new=1), position_ids=torch.tensor([[4], [4]]))
    sent = [step for _, step in peers.stream(session.endpoints[0]).received]
    assert [step.HasField("position_ids") for step in sent] == [False, True, True, True]
