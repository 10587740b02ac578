"""client.verify over fake peers (tests/client/fakes.py), some of which lie: which calls are
checked, the distance and its dtype-aware tolerance, verdicts by a referee, and the work of a
convicted peer redone so the answer is the honest one (real liars:
tests/integration/test_verification.py)."""

from __future__ import annotations

import math

import pytest
import torch

from client import session as session_module
from client.autograd import remote_forward
from client.routing import MissingBlocksError
from client.session import InferenceSession
from client.verify import DTYPE_TOLERANCE, Verifier, distance
from swarm.flags import count_flags, flags_key

from tests.client.fakes import FakePeers, hidden, peer, swarm_of


@pytest.fixture
def peers(monkeypatch) -> FakePeers:
    fake = FakePeers(supports_push=False)
    monkeypatch.setattr(session_module.PeerConnection, "to", fake.to)
    return fake


# --- distance and tolerance -----------------------------------------------------------------


def test_honest_rounding_stays_inside_the_tolerance_and_a_small_lie_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64) * torch.logspace(0, 3, 7)[None, :, None]  # tokens of very different norms
    assert distance(x, x.clone()) == 0.0
    assert distance(x.bfloat16().float(), x) < DTYPE_TOLERANCE["bfloat16"] / 4
    assert distance(x.half().float(), x) < DTYPE_TOLERANCE["float16"] / 4
    lied = x.clone()
    lied[1, 0] *= 1.01  # one token of the smallest norm, off by 1%
    assert distance(lied, x) > DTYPE_TOLERANCE["float32"]


def test_distance_of_different_shapes_or_nan_is_infinite():
    x = torch.ones(1, 2, 4)
    assert distance(x, torch.ones(1, 3, 4)) == math.inf
    assert distance(x, torch.full_like(x, float("nan"))) == math.inf
    assert distance(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)) == 0.0


def test_a_peers_first_call_of_each_kind_is_checked_then_a_fraction(monkeypatch):
    verifier = Verifier(swarm_of(monkeypatch, peer("a", 0, 30)), fraction=0.25)
    verifier.rng.seed(0)
    assert verifier.due("a", "inference")
    verifier._vouched.add(("a", "inference"))
    assert verifier.due("a", "forward"), "vouched for inference, still on probation for Forward"
    checked = sum(verifier.due("a", "inference") for _ in range(4000))
    assert 900 < checked < 1100


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_verify_must_be_a_fraction(monkeypatch, fraction):
    swarm = swarm_of(monkeypatch, peer("a", 0, 30))
    assert swarm.verifier is None
    with pytest.raises(ValueError, match="fraction"):
        Verifier(swarm, fraction)


# --- inference ------------------------------------------------------------------------------


def test_a_lying_primary_is_outvoted_banned_flagged_and_the_session_rebuilt(monkeypatch, peers):
    liar, b, c = peer("liar", 0, 30, throughput=1000.0), peer("b", 0, 30), peer("c", 0, 30)
    peers.liars.add(liar.endpoint)
    swarm = swarm_of(monkeypatch, liar, b, c, verify=0.5)
    x = hidden(new=3)
    with InferenceSession(swarm, max_length=8) as session:
        torch.testing.assert_close(session.step(x[:, :2]), x[:, :2] + 30)
        torch.testing.assert_close(session.step(x[:, 2:]), x[:, 2:] + 30)
        assert liar.endpoint not in session.endpoints
    assert swarm.verifier.convicted == {"liar"}
    assert count_flags(swarm.model_id, swarm.dht.get(flags_key(swarm.model_id))) == {"liar": 1}


def test_a_lying_checker_is_outvoted_and_the_primarys_answer_stands(monkeypatch, peers):
    a, liar, c = peer("a", 0, 30, throughput=1000.0), peer("liar", 0, 30, throughput=500.0), peer("c", 0, 30)
    peers.liars.add(liar.endpoint)
    swarm = swarm_of(monkeypatch, a, liar, c, verify=1.0)
    x = hidden(new=3)
    with InferenceSession(swarm, max_length=8) as session:
        for i in range(3):
            torch.testing.assert_close(session.step(x[:, i:i + 1]), x[:, i:i + 1] + 30)
        assert session.endpoints == [a.endpoint]
    assert swarm.verifier.convicted == {"liar"}
    # c refereed, then became a's checker: its mirror ran each of the 3 tokens once.
    assert sum(step.hidden_states.shape[1] for _, step in peers.stream(c.endpoint).received) == 3


def test_one_check_covers_every_step_since_the_last(monkeypatch, peers):
    """A peer that lies only on its 3rd step is caught at the next check, whenever that is."""
    a, b, c = peer("a", 0, 30, throughput=1000.0), peer("b", 0, 30), peer("c", 0, 30)
    swarm = swarm_of(monkeypatch, a, b, c, verify=0.01)
    swarm.verifier.rng.seed(1)
    x = hidden(new=8)
    with InferenceSession(swarm, max_length=8) as session:
        session.step(x[:, :1])  # probation: checked, mirror opened on b
        for i in range(1, 7):
            if i == 2:
                peers.liars.add(a.endpoint)
            elif i == 3:
                peers.liars.discard(a.endpoint)  # lied once, then honest again
            session.step(x[:, i:i + 1])
        assert swarm.verifier.checks == 1 and not swarm.verifier.convicted
        swarm.verifier.fraction = 1.0
        torch.testing.assert_close(session.step(x[:, 7:]), x[:, 7:] + 30)
    assert swarm.verifier.convicted == {"a"}


def test_without_a_second_peer_the_work_goes_unchecked(monkeypatch, peers, caplog):
    only = peer("only", 0, 30)
    swarm = swarm_of(monkeypatch, only, verify=1.0)
    with InferenceSession(swarm, max_length=8) as session:
        session.step(hidden(new=1))
        session.step(hidden(new=1))
    assert swarm.verifier.checks == 0
    assert sum("no second peer" in r.message for r in caplog.records) == 1


def test_two_peers_that_disagree_with_no_referee_are_both_left_out(monkeypatch, peers):
    liar, b = peer("liar", 0, 30, throughput=1000.0), peer("b", 0, 30)
    peers.liars.add(liar.endpoint)
    swarm = swarm_of(monkeypatch, liar, b, verify=1.0)
    with InferenceSession(swarm, max_length=8) as session:
        with pytest.raises(MissingBlocksError, match="2 peer.s. serving them are left out"):
            session.step(hidden(new=1))
    assert not swarm.verifier.convicted and not count_flags(swarm.model_id, swarm.dht.get(flags_key(swarm.model_id)))


def test_a_referee_may_be_a_chain_of_another_split(monkeypatch, peers):
    liar, b = peer("liar", 0, 30, throughput=1000.0), peer("b", 0, 30)
    peers.liars.add(liar.endpoint)
    swarm = swarm_of(monkeypatch, liar, b, peer("c", 0, 15), peer("d", 15, 30), verify=1.0)
    x = hidden(new=1)
    with InferenceSession(swarm, max_length=8) as session:
        # b checks the liar; the referee is the chain c -> d, which agrees with b.
        torch.testing.assert_close(session.step(x), x + 30)
    assert swarm.verifier.convicted == {"liar"}


# --- Forward and Backward -------------------------------------------------------------------


def test_training_through_a_liar_gives_the_honest_output_and_gradients(monkeypatch, peers):
    liar, b, c = peer("liar", 0, 30, throughput=1000.0), peer("b", 0, 30), peer("c", 0, 30)
    peers.liars.add(liar.endpoint)
    swarm = swarm_of(monkeypatch, liar, b, c, verify=0.2)
    x = torch.randn(1, 3, 4, requires_grad=True)
    out = remote_forward(swarm, x)
    torch.testing.assert_close(out, x.detach() * 2)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert swarm.verifier.convicted == {"liar"}


def test_a_backward_that_lies_is_caught_too(monkeypatch, peers):
    a, b, c = peer("a", 0, 30, throughput=1000.0), peer("b", 0, 30), peer("c", 0, 30)
    swarm = swarm_of(monkeypatch, a, b, c, verify=0.2)
    x = torch.randn(1, 3, 4, requires_grad=True)
    out = remote_forward(swarm, x)  # a's forward is honest and vouched for
    peers.liars.add(a.endpoint)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert swarm.verifier.convicted == {"a"}
