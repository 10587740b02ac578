"""client.autograd: remote_forward as a torch autograd Function over fake peers whose blocks
double the hidden states (tests/client/fakes.py): the output and gradient of a chain, the
Backward naming each Forward's kept graph, and failed hops redone on other peers (real peers:
tests/integration/test_client_training.py)."""

from __future__ import annotations

import pytest
import torch

from client import autograd
from client.autograd import remote_forward

from tests.client.fakes import FakePeers, peer, swarm_of


@pytest.fixture
def peers(monkeypatch) -> FakePeers:
    fake = FakePeers()
    monkeypatch.setattr(autograd.PeerConnection, "to", fake.to)
    return fake


def test_forward_and_backward_go_through_each_hop(monkeypatch, peers):
    swarm = swarm_of(monkeypatch, peer("a", 0, 10), peer("b", 10, 30))
    x = torch.randn(1, 3, 4, requires_grad=True)
    out = remote_forward(swarm, x, attention_mask=torch.ones(1, 3))
    torch.testing.assert_close(out, x.detach() * 4)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))
    kinds = [(kind, (r.inputs.start, r.inputs.end)) for _, kind, r in peers.calls]
    assert kinds == [("forward", (0, 10)), ("forward", (10, 30)), ("backward", (10, 30)), ("backward", (0, 10))]
    forwards = {r.inputs.start: r.backward_id for _, kind, r in peers.calls if kind == "forward"}
    backwards = {r.inputs.start: r.backward_id for _, kind, r in peers.calls if kind == "backward"}
    assert backwards == forwards and all(forwards.values()) and len(set(forwards.values())) == 2, \
        "each Backward names its own hop's kept graph"
    assert all(r.inputs.HasField("attention_mask") for _, _, r in peers.calls)


def test_without_gradients_no_graph_is_kept(monkeypatch, peers):
    swarm = swarm_of(monkeypatch, peer("a", 0, 30))
    with torch.no_grad():
        remote_forward(swarm, torch.randn(1, 2, 4, requires_grad=True))
    assert [r.backward_id for _, _, r in peers.calls] == [""]


def test_a_slice_of_the_blocks(monkeypatch, peers):
    swarm = swarm_of(monkeypatch, peer("a", 0, 10), peer("b", 10, 20), peer("c", 20, 30))
    x = torch.randn(1, 2, 4)
    torch.testing.assert_close(remote_forward(swarm, x, start=10, end=20), x * 2)
    assert [(r.inputs.start, r.inputs.end) for _, _, r in peers.calls] == [(10, 20)]


@pytest.mark.parametrize("fails_in", ["forward", "backward"])
def test_a_failed_hop_is_redone_on_another_peer(monkeypatch, peers, fails_in):
    b, spare = peer("b", 10, 30), peer("spare", 10, 30, throughput=0.1)  # spare: only once b is avoided
    swarm = swarm_of(monkeypatch, peer("a", 0, 10), b, spare)
    x = torch.randn(1, 2, 4, requires_grad=True)
    if fails_in == "forward":
        peers.dead.add(b.endpoint)
    out = remote_forward(swarm, x)
    if fails_in == "backward":
        peers.dead.add(b.endpoint)
    out.sum().backward()
    torch.testing.assert_close(out, x.detach() * 4)
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))
    spare_calls = [kind for endpoint, kind, _ in peers.calls if endpoint == spare.endpoint]
    # A failed Backward recomputes the hop's Forward on the spare (to rebuild its graph) first.
    assert spare_calls == ["forward", "backward"]
