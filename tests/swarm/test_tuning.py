"""swarm.tuning: LoRA applied inside remote blocks gives PEFT's gradients span by span, its
dropout is reproducible between Forward and Backward, and bad tensors are refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from swarm.blocks import BlockSpan, SpanInputs
from swarm.tuning import AdapterError, AdapterSet, LoRA, method_from_json

RANK, ALPHA = 4, 8.0


def lora_tensors(span: BlockSpan, method: LoRA, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random, non-zero A and B for every block of the span (PEFT would start B at zero, which
    hides half the arithmetic)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = method.tensor_shapes(span.layers[0])
    return {
        f"{span.start + i}.{name}": torch.randn(shape, generator=generator) * scale
        for i in range(span.length) for name, shape in shapes.items()
    }


def test_lora_grads_match_peft(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts):
    from peft import LoraConfig, get_peft_model

    ids = smollm2_tokenizer("LoRA adds a low-rank update to frozen weights.", return_tensors="pt").input_ids[:, :12]
    method = LoRA(rank=RANK, alpha=ALPHA, targets=["q_proj", "v_proj"])
    sets = [AdapterSet(method, lora_tensors(span, method, seed=span.start)) for span in smollm2_spans]

    # Reference: PEFT on a copy of the whole transformers model, given the same A and B.
    peft_model = get_peft_model(copy.deepcopy(smollm2_model), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    peft_params = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        for proj in ("q_proj", "v_proj"):
            module = getattr(layer.self_attn, proj)
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part)["default"].weight
                with torch.no_grad():
                    weight.copy_(sets[i // 10].tensors[f"{i}.self_attn.{proj}.{part}"])
                peft_params[f"{i}.self_attn.{proj}.{part}"] = weight
    logits = peft_model(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    expected = dict(zip(peft_params, torch.autograd.grad(loss, list(peft_params.values()))))

    # The swarm: forward span by span, backward in reverse, each span returning its LoRA grads.
    hidden, inputs = smollm2_parts.embed(ids), []
    with torch.no_grad():
        for span, adapters in zip(smollm2_spans, sets):
            inputs.append(hidden)
            hidden = span(SpanInputs(hidden, adapters=[adapters]))
    hidden.requires_grad_(True)
    swarm_loss = F.cross_entropy(smollm2_parts.logits(hidden)[0, :-1], ids[0, 1:])
    torch.testing.assert_close(swarm_loss, loss, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(swarm_loss, hidden)
    actual = {}
    for span, adapters, span_input in reversed(list(zip(smollm2_spans, sets, inputs))):
        span_grads = span.backward(SpanInputs(span_input, adapters=[adapters]), grad)
        grad = span_grads.hidden_states
        assert set(span_grads.adapters[0]) == set(adapters.tensors)
        actual.update(span_grads.adapters[0])

    assert set(actual) == set(expected) and len(actual) == 30 * 4
    for name, expected_grad in expected.items():
        assert expected_grad.abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected_grad, rtol=1e-3,
                                   atol=1e-4 * expected_grad.abs().max().item(), msg=name)


def test_lora_in_an_inference_session_matches_forward(smollm2_spans):
    span = smollm2_spans[1]
    method = LoRA(rank=RANK, alpha=ALPHA)
    adapters = AdapterSet(method, lora_tensors(span, method, seed=5))
    hidden = torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = span(SpanInputs(hidden, adapters=[adapters]))
        plain = span(SpanInputs(hidden))
    state = span.start_inference(1, 8, adapters=[adapters])
    prefill = span.inference_step(state, hidden[:, :5])
    last = span.inference_step(state, hidden[:, 5:])
    torch.testing.assert_close(torch.cat([prefill, last], dim=1), expected, rtol=1e-4, atol=1e-4)
    assert (expected - plain).abs().max() > 1e-3, "the adapter must change the outputs"
    assert not span.layers[0].self_attn.q_proj._forward_hooks, "hooks must not outlive the call"


def test_lora_dropout_is_reproducible_from_the_seed(smollm2_spans):
    span = smollm2_spans[2]
    hidden = torch.randn(1, 8, span.hidden_size, generator=torch.Generator().manual_seed(1))
    grad_outputs = torch.randn_like(hidden)
    tensors = lora_tensors(span, LoRA(rank=RANK, alpha=ALPHA), seed=3)

    def run(dropout: float, seed: int | None) -> torch.Tensor:
        with torch.no_grad():
            lora = AdapterSet(LoRA(RANK, ALPHA, dropout=dropout, seed=seed), tensors)
            return span(SpanInputs(hidden, adapters=[lora]))

    first, second = run(0.3, seed=11), run(0.3, seed=11)
    assert torch.equal(first, second)
    assert (first - run(0.3, seed=12)).abs().max() > 1e-4, "another seed must draw other masks"
    assert (first - run(0.0, seed=11)).abs().max() > 1e-4, "dropout must actually drop"
    assert torch.equal(run(0.3, seed=None), run(0.0, seed=None)), "no seed: dropout off (inference)"

    # Backward recomputes the forward: it must draw the very masks the forward drew, so its
    # grads equal autograd through one forward call with that seed.
    method = LoRA(RANK, ALPHA, dropout=0.3, seed=11)
    grads = span.backward(SpanInputs(hidden, adapters=[AdapterSet(method, tensors)]), grad_outputs)
    leaves = {name: t.clone().requires_grad_(True) for name, t in tensors.items()}
    inputs = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = span(SpanInputs(inputs, adapters=[AdapterSet(method, leaves)]))
        torch.testing.assert_close(outputs, first, rtol=0, atol=0)
        expected = torch.autograd.grad((outputs * grad_outputs).sum(), [inputs, *leaves.values()])
    torch.testing.assert_close(grads.hidden_states, expected[0], rtol=0, atol=0)
    for (name, _), expected_grad in zip(leaves.items(), expected[1:]):
        torch.testing.assert_close(grads.adapters[0][name], expected_grad, rtol=0, atol=0, msg=name)
    other_lora = AdapterSet(LoRA(RANK, ALPHA, dropout=0.3, seed=12), tensors)
    other = span.backward(SpanInputs(hidden, adapters=[other_lora]), grad_outputs)
    assert (other.hidden_states - grads.hidden_states).abs().max() > 0


def test_bad_lora_tensors_are_refused(smollm2_spans):
    span = smollm2_spans[0]
    method = LoRA(rank=RANK, alpha=ALPHA)
    good = lora_tensors(span, method, seed=0)
    hidden = torch.randn(1, 3, span.hidden_size)

    wrong_shape = dict(good, **{"3.self_attn.q_proj.lora_A": torch.zeros(RANK, 575)})
    with pytest.raises(AdapterError, match=r"3\.self_attn\.q_proj\.lora_A has shape \(4, 575\), expected \(4, 576\)"):
        span(SpanInputs(hidden, adapters=[AdapterSet(method, wrong_shape)]))

    missing = {k: v for k, v in good.items() if k != "7.self_attn.v_proj.lora_B"}
    with pytest.raises(AdapterError, match=r"block 7: missing \['self_attn\.v_proj\.lora_B'\]"):
        span(SpanInputs(hidden, adapters=[AdapterSet(method, missing)]))

    stray = dict(good, **{"12.self_attn.q_proj.lora_A": torch.zeros(RANK, 576)})
    with pytest.raises(AdapterError, match=r"blocks \[12\] outside the span \[0, 10\)"):
        span(SpanInputs(hidden, adapters=[AdapterSet(method, stray)]))

    integers = dict(good, **{"0.self_attn.q_proj.lora_B": torch.zeros(576, RANK, dtype=torch.long)})
    with pytest.raises(AdapterError, match="must be floating point"):
        span(SpanInputs(hidden, adapters=[AdapterSet(method, integers)]))

    with pytest.raises(AdapterError, match=r"'o_projection' matches no linear layer.*self_attn\.o_proj"):
        span(SpanInputs(hidden, adapters=[AdapterSet(LoRA(rank=RANK, targets=["o_projection"]), good)]))

    with pytest.raises(AdapterError, match=r"has shape \(4, 575\)"):  # a session is refused when it opens
        span.start_inference(1, 4, adapters=[AdapterSet(method, wrong_shape)])
    assert not any(layer.self_attn.q_proj._forward_hooks for layer in span.layers), "a refused call leaves no hooks"


def test_lora_settings_are_checked():
    with pytest.raises(AdapterError, match=r"rank must be in \[1, 1024\], got 0"):
        LoRA(rank=0)
    with pytest.raises(AdapterError, match=r"dropout must be in \[0, 1\), got 1.0"):
        LoRA(dropout=1.0)
    with pytest.raises(AdapterError, match="at least one target"):
        LoRA(targets=[])
    method = LoRA(rank=2, alpha=4, targets=["q_proj"], dropout=0.1, seed=3)
    again = method_from_json("lora", method.to_json())
    assert again.settings() == method.settings() and again.scaling == 2.0
    with pytest.raises(AdapterError, match="unknown adapter method 'ia4'; known: bottleneck, ia3, lora, prefix"):
        method_from_json("ia4", "{}")
    with pytest.raises(AdapterError, match="not valid JSON"):
        method_from_json("lora", "{rank: 2")
    with pytest.raises(AdapterError, match="bad lora settings"):
        method_from_json("lora", '{"rnak": 2}')


def test_kept_graph_backward_equals_recomputed_backward(smollm2_spans):
    """What a peer does when Forward keeps its graph: the same output and the same gradients
    (inputs, deep prompts, LoRA) as Backward's recomputation, counting only activation bytes."""
    span = smollm2_spans[1]
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, span.hidden_size, generator=generator)
    prompts = torch.randn(span.length, 2, 3, span.hidden_size, generator=generator) * 0.1
    method = LoRA(rank=RANK, alpha=ALPHA, targets=["q_proj", "v_proj"], dropout=0.1, seed=7)
    adapters = [AdapterSet(method, lora_tensors(span, method, seed=1))]
    grad_outputs = torch.randn(2, 6, span.hidden_size, generator=generator)

    output, graph = span.forward_with_graph(SpanInputs(hidden, deep_prompts=prompts, adapters=adapters))
    assert torch.equal(output, span(SpanInputs(hidden, deep_prompts=prompts, adapters=adapters)))
    assert not output.requires_grad
    kept = graph.backward(grad_outputs)
    recomputed = span.backward(SpanInputs(hidden, deep_prompts=prompts, adapters=adapters), grad_outputs)
    assert torch.equal(kept.hidden_states, recomputed.hidden_states)
    assert torch.equal(kept.deep_prompts, recomputed.deep_prompts)
    assert kept.adapters[0].keys() == recomputed.adapters[0].keys()
    assert all(torch.equal(kept.adapters[0][k], recomputed.adapters[0][k]) for k in kept.adapters[0])

    weight_bytes = sum(p.numel() * p.element_size() for p in span.parameters())
    assert 0 < graph.nbytes < weight_bytes / 10, (graph.nbytes, weight_bytes)
    with pytest.raises(RuntimeError, match="already used"):
        graph.backward(grad_outputs)  # spent: its saved activations are gone
    with pytest.raises(ValueError, match="must equal the forward's output shape"):
        span.forward_with_graph(SpanInputs(hidden))[1].backward(grad_outputs[:1])
