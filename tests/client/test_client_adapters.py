"""The client's own adapter parameters (client.tuning.ClientAdapter) trained through spans run
in-process: a reparametrised prefix's MLP gets PEFT's gradients, and 30 Adam steps of every
method halve the loss. The spans and references are tests/swarm/test_tuning_methods.py's."""

from __future__ import annotations

import copy

import pytest
import torch

from client.tuning import ClientAdapter
from swarm.blocks import SpanInputs
from swarm.tuning import IA3, BottleneckAdapter, LoRA, PrefixTuning
from tests.swarm.test_tuning_methods import (IDS, assert_grads_close, family, lm_loss, logits_of,  # noqa: F401
                                             peft_prefix, span_set, spans, swarm_grads, tiny)


def test_prefix_reparametrisation_trains_like_peft(tiny, spans, family):
    """PEFT's prefix_projection MLP runs on the client; peers see only its keys/values, and the
    gradients they return flow on into the MLP exactly as PEFT's do."""
    method = PrefixTuning(num_virtual_tokens=3, projection=24)
    torch.manual_seed(3)
    reference = peft_prefix(copy.deepcopy(tiny), None, projection=24)
    adapter = ClientAdapter(method, family)
    encoder = reference.prompt_encoder["default"]
    adapter.encoder.load_state_dict(encoder.state_dict())
    expected_loss = lm_loss(reference(input_ids=IDS).logits, IDS)
    expected = torch.autograd.grad(expected_loss, list(encoder.parameters()))

    tensors = adapter.tensors()
    loss, grads = swarm_grads(tiny, spans, IDS, method, {n: t.detach() for n, t in tensors.items()})
    torch.testing.assert_close(loss, expected_loss)
    torch.autograd.backward([tensors[n] for n in grads], [grads[n] for n in grads])
    for (name, param), want in zip(adapter.encoder.named_parameters(), expected):
        assert_grads_close(param.grad, want, name)


@pytest.mark.parametrize("methods, lr", [
    ([IA3()], 5e-2),
    ([PrefixTuning(num_virtual_tokens=4)], 5e-2),
    ([PrefixTuning(num_virtual_tokens=4, projection=32)], 1e-2),
    ([BottleneckAdapter("pfeiffer", reduction_factor=8)], 1e-2),
    ([BottleneckAdapter("houlsby", reduction_factor=8)], 1e-2),
    ([LoRA(rank=4, alpha=8), IA3()], 1e-2),
], ids=["ia3", "prefix", "prefix-mlp", "pfeiffer", "houlsby", "lora+ia3"])
def test_30_adam_steps_halve_the_loss(tiny, spans, family, methods, lr):
    """The spans are what peers run, differentiable in-process here: through real peers the
    same step gives the same gradients (tests/integration/test_swarm_tuning_methods.py)."""
    torch.manual_seed(0)
    adapters = [ClientAdapter(method, family) for method in methods]
    optimizer = torch.optim.Adam([p for a in adapters for p in a.parameters()], lr=lr)
    ids = torch.tensor([[5, 17, 42, 8, 63, 21, 9, 77], [30, 2, 11, 54, 8, 90, 3, 45]])
    losses = []
    for _ in range(30):
        hidden = tiny.model.embed_tokens(ids)
        tensors = [a.tensors() for a in adapters]
        for span in spans:
            hidden = span(SpanInputs(hidden, adapters=[span_set(span, a.method, t) for a, t in zip(adapters, tensors)]))
        loss = lm_loss(logits_of(tiny, hidden), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses


