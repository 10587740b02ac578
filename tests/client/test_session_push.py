"""The client side of server-to-server push (client/session.py): a step goes to the first
peer only, naming the peers it is pushed on to; the client still keeps, per hop, the step
as that hop ran it (for recovery); a failed push makes the client feed the next hop itself.
Fake peers push in-process (tests/client/fakes.py); real ones: tests/integration/test_push.py."""

from __future__ import annotations

import pytest
import torch

from client import session as session_module
from client.session import InferenceSession
from swarm.wire import deserialize_tensor

from tests.client.fakes import FakePeers, hidden, peer, swarm_of


@pytest.fixture
def peers(monkeypatch) -> FakePeers:
    fake = FakePeers(supports_push=True)
    monkeypatch.setattr(session_module.PeerConnection, "to", fake.to)
    return fake


@pytest.fixture
def swarm(monkeypatch):
    return swarm_of(monkeypatch, peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30))


def test_a_step_is_sent_once_and_pushed_through_the_chain(peers, swarm):
    x = hidden()
    with InferenceSession(swarm, max_length=8) as session:
        torch.testing.assert_close(session.step(x), x + 30)
        a, b, c = (peers.stream(e) for e in session.endpoints)
        assert [via for via, _ in a.received + b.received + c.received] == ["client", "push", "push"]
        assert [t.endpoint for t in a.received[0][1].push_to] == session.endpoints[1:]
        assert {t.session_id for t in a.received[0][1].push_to} == {session.session_id}
        # Per hop, the step as that hop ran it: its own inputs, no push targets.
        histories = [h.history for h in session._hops]
        assert [len(h) for h in histories] == [1, 1, 1] and not any(h[0].push_to for h in histories)
        for history, grown in zip(histories, (0, 10, 20)):
            torch.testing.assert_close(deserialize_tensor(history[0].hidden_states), x + grown)


def test_without_push_or_support_the_client_feeds_every_hop(monkeypatch, peers, swarm):
    swarm.settings.push = False
    with InferenceSession(swarm, max_length=8) as session:
        session.step(hidden())
        assert [peers.stream(e).received[0][0] for e in session.endpoints] == ["client"] * 3


def test_a_failed_push_is_sent_by_the_client_and_not_asked_again(peers, swarm):
    x = hidden(new=1)
    with InferenceSession(swarm, max_length=8) as session:
        peers.pushes_fail.add(swarm.records()[10][0].endpoint)  # b cannot reach c
        torch.testing.assert_close(session.step(x), x + 30)
        a, b, c = (peers.stream(e) for e in session.endpoints)
        assert [via for via, _ in c.received] == ["client"], "c got the step from the client after b's push failed"
        assert session._hops[1].push_failed and not session._hops[0].push_failed
        session.step(x)
        second = b.received[1][1]
        assert not second.push_to, "b is not asked to push again"
        assert [via for via, _ in b.received] == ["push", "push"], "a still pushes to b"
