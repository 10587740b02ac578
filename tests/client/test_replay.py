"""client.replay: past steps are sent merged where they only append tokens, and each step's
output comes back as if it had been sent alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from client import messages
from client.replay import replay
from swarm.wire import deserialize_tensor

from tests.client.fakes import FakePeers


def steps(*shapes, hypo_at=(), masked=False):
    position, made = 0, []
    for i, new in enumerate(shapes, start=1):
        x = torch.full((2, new, 4), float(i))
        made.append(messages.inference_step(i, position, x, "raw",
                                            attention_mask=torch.ones(2, new) if masked else None,
                                            hypo_ids=torch.tensor([1, 0]) if i in hypo_at else None))
        position += new
    return made


def hop(peers: FakePeers, endpoint: str):
    stream = peers.to(endpoint).open_inference(SimpleNamespace(start=0, end=10), timeout=1.0)
    return SimpleNamespace(stream=stream, history=[])


def test_appending_steps_are_merged_and_answered_per_step():
    peers = FakePeers(supports_push=False)
    hops = [hop(peers, "a:1"), hop(peers, "b:1")]
    sent = steps(3, 1, 1, 1, hypo_at=(3,))
    outputs = replay(hops, sent)
    for step, output in zip(sent, outputs):
        torch.testing.assert_close(deserialize_tensor(output), deserialize_tensor(step.hidden_states) + 20)
    received = [(s.step_id, s.hidden_states.shape[1]) for _, s in peers.stream("a:1").received]
    assert received == [(2, 4), (4, 2)], "a reorder (hypo ids) may only open a merged step"
    assert [s.step_id for s in hops[1].history] == [1, 2, 3, 4], "histories keep the steps as they were"


def test_steps_with_masks_merge_their_masks():
    peers = FakePeers(supports_push=False)
    replay([hop(peers, "a:1")], steps(2, 1, masked=True), record=False)
    (_, merged), = peers.stream("a:1").received
    assert tuple(merged.attention_mask.shape) == (2, 3)
