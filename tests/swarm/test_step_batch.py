"""Decode steps of several sessions run as one forward pass (swarm/step_batch.py) give each
session what it gets alone: every family, sessions of different lengths, padding, batch
sizes, beams reordered, a rollback, a prefix (joins) and a LoRA (runs apart)."""

from __future__ import annotations

import pytest
import torch

from swarm.blocks import BlockSpan
from swarm.step_batch import StepArgs
from swarm.tuning import AdapterError, AdapterSet, LoRA, PrefixTuning
from tests.swarm.test_models import TINY_CONFIGS, TinyModel

pytestmark = pytest.mark.compat  # the joined pass leans on the families' masks and cache layers


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def span(request, tmp_path_factory) -> BlockSpan:
    return TinyModel(request.param, tmp_path_factory.mktemp(request.param)).spans[-1]


def random_set(span: BlockSpan, method, seed: int) -> AdapterSet:
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"{span.start + i}.{name}": torch.randn(shape, generator=generator) * 0.3
               for i, layer in enumerate(span.layers) for name, shape in method.tensor_shapes(layer).items()}
    return AdapterSet(method, tensors)


def sessions(span: BlockSpan) -> list[dict]:
    """Each session's opening and prompt: lengths 5..9, one left-padded batch of 2, a prefix, a LoRA."""
    plans = [dict(batch=1, prompt=5), dict(batch=1, prompt=9), dict(batch=2, prompt=7, padding=3),
             dict(batch=1, prompt=4, padding=1)]
    for method, seed in ((PrefixTuning(num_virtual_tokens=3), 11), (LoRA(rank=2, targets=span.family.default_lora_targets), 12)):
        try:
            adapters = [random_set(span, method, seed)]
            span.start_inference(1, 16, adapters=adapters)
        except AdapterError:  # a family the method does not fit (checked by its own tests)
            continue
        plans.append(dict(batch=1, prompt=6, adapters=adapters))
    return plans


def hidden(batch: int, new: int, seed: int, size: int) -> torch.Tensor:
    return torch.randn(batch, new, size, generator=torch.Generator().manual_seed(seed))


def test_joined_steps_equal_steps_alone(span: BlockSpan):
    plans, size = sessions(span), span.hidden_size
    alone = [span.start_inference(p["batch"], 16, adapters=p.get("adapters", ())) for p in plans]
    joined = [span.start_inference(p["batch"], 16, adapters=p.get("adapters", ())) for p in plans]
    for i, plan in enumerate(plans):  # prompts run alone in both
        mask = None
        if plan.get("padding"):
            mask = torch.ones(plan["batch"], plan["prompt"], dtype=torch.long)
            mask[-1, : plan["padding"]] = 0
        prompt = hidden(plan["batch"], plan["prompt"], i, size)
        for states in (alone, joined):
            span.inference_step(states[i], prompt, attention_mask=mask)
    passes = []
    for step in range(4):
        steps = []
        for i, plan in enumerate(plans):
            args = dict(hidden_states=hidden(plan["batch"], 1, 100 * step + i, size))
            if plan["batch"] == 2 and step == 1:
                args["hypo_ids"] = torch.tensor([1, 1])  # beam search keeps the second row twice
            if i == 1 and step == 2:
                args["position"] = alone[i].position - 2  # a rollback: the client replays
            steps.append(args)
        expected = [span.inference_step(state, **args) for state, args in zip(alone, steps)]
        run = span.inference_steps([StepArgs(state, **args) for state, args in zip(joined, steps)])
        passes += run.passes
        for i, (got, want) in enumerate(zip(run.results, expected)):
            assert not isinstance(got, Exception), got
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5, msg=f"session {i}, step {step}")
        assert [s.position for s in joined] == [s.position for s in alone]
    lora = any(a.method.hooks_layers for p in plans for a in p.get("adapters", ()))
    assert max(passes) == len(plans) - lora  # everyone but the LoRA session in one pass
    assert passes.count(1) == 4 * lora


def test_joined_prompts_equal_prompts_alone(span: BlockSpan):
    """Sessions' first steps in one pass (swarm/joined_prompts.py), of different lengths, one a
    left-padded batch of 2: each session's output, and then its cache (its next steps), as alone."""
    plans, size = sessions(span), span.hidden_size
    alone = [span.start_inference(p["batch"], 16, adapters=p.get("adapters", ())) for p in plans]
    joined = [span.start_inference(p["batch"], 16, adapters=p.get("adapters", ())) for p in plans]
    steps = []
    for i, plan in enumerate(plans):
        mask = None
        if plan.get("padding"):
            mask = torch.ones(plan["batch"], plan["prompt"], dtype=torch.long)
            mask[-1, : plan["padding"]] = 0
        steps.append(dict(hidden_states=hidden(plan["batch"], plan["prompt"], i, size), attention_mask=mask))
    for step in range(3):
        expected = [span.inference_step(state, **args) for state, args in zip(alone, steps)]
        run = span.inference_steps([StepArgs(state, **args) for state, args in zip(joined, steps)])
        for i, (got, want, args) in enumerate(zip(run.results, expected, steps)):
            assert not isinstance(got, Exception), got
            real = args.get("attention_mask") is None or args["attention_mask"].bool()  # padding's output is nobody's
            torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=5e-5, msg=f"session {i}, step {step}")
            assert torch.isfinite(got).all()
        assert [s.position for s in joined] == [s.position for s in alone]
        if step == 0:  # the prefix (in the cache already) and the LoRA (hooks) run apart
            apart = sum(bool(p.get("adapters")) for p in plans)
            assert sorted(run.passes) == [1] * apart + [len(plans) - apart]
        steps = [dict(hidden_states=hidden(p["batch"], 1, 10 * step + i, size)) for i, p in enumerate(plans)]


def test_a_failed_prompt_pass_leaves_the_sessions_empty(span: BlockSpan, monkeypatch):
    states = [span.start_inference(1, 8) for _ in range(2)]

    def failing(*args, **kwargs):  # the last layer fails, after the first filled the caches
        raise RuntimeError("out of memory")

    monkeypatch.setattr(span.layers[-1], "forward", failing)
    run = span.inference_steps([StepArgs(state, hidden(1, 3, i, span.hidden_size)) for i, state in enumerate(states)])
    assert all(isinstance(result, RuntimeError) for result in run.results)
    assert [state.position for state in states] == [0, 0]
    assert [state.cache.get_seq_length() for state in states] == [0, 0]
    monkeypatch.undo()
    again = span.inference_steps([StepArgs(state, hidden(1, 3, i, span.hidden_size)) for i, state in enumerate(states)])
    for state, result, i in zip(states, again.results, range(2)):
        alone = span.inference_step(span.start_inference(1, 8), hidden(1, 3, i, span.hidden_size))
        torch.testing.assert_close(result, alone, rtol=1e-4, atol=5e-5)


def test_a_refused_step_fails_alone(span: BlockSpan):
    states = [span.start_inference(1, 8) for _ in range(3)]
    for i, state in enumerate(states):
        span.inference_step(state, hidden(1, 3, i, span.hidden_size))
    steps = [StepArgs(state, hidden(1, 1, 9, span.hidden_size)) for state in states]
    steps[1] = steps[1]._replace(position=5)  # ahead of the 3 tokens the session holds
    run = span.inference_steps(steps)
    assert isinstance(run.results[1], Exception) and "ahead" in str(run.results[1])
    assert run.passes == [2]
    assert [s.position for s in states] == [4, 3, 4]
