"""swarm.models families beyond Llama (Mixtral, Gemma 3, Falcon, BLOOM, Phi-3): on tiny random
models saved as Hugging Face folders, gradients through the spans (deep prompts, LoRA) equal
transformers' own (PEFT's for LoRA), and the client's parts are the family's own.

Logits, greedy tokens, padding and cache rollback for the same models are in test_models.py,
which holds their configs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from swarm.blocks import SpanInputs
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.models import get_family
from swarm.tuning import AdapterSet, LoRA
from tests.swarm.test_blocks import assert_grads_close, chained_backward, chained_forward
from tests.swarm.test_models import TINY_CONFIGS, TinyModel, prompt_ids

pytestmark = pytest.mark.compat  # every non-Llama family leans on its transformers layers

NEW_FAMILIES = ["mixtral", "gemma3_text", "falcon", "falcon-alibi", "bloom", "phi3"]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def tiny(request, tmp_path_factory) -> TinyModel:
    model = TinyModel(request.param, tmp_path_factory.mktemp(request.param))
    model.model.requires_grad_(False)
    model.family = get_family(model.checkpoint.config)
    model.layers = model.model.get_submodule(model.family.layers_prefix)
    return model


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0, :-1], ids[0, 1:])


def test_every_new_family_is_tested():
    assert set(NEW_FAMILIES) <= set(TINY_CONFIGS)


def test_client_parts_are_the_familys_own(tiny: TinyModel):
    """What enters block 0 and the logits made from what leaves the last block, taken from
    transformers' own model with hooks: Gemma's scale, BLOOM's embedding LayerNorm, each
    family's final norm, Gemma's soft-capping."""
    seen = {}

    def keep_input(module, args) -> None:
        seen["in"] = args[0]

    def keep_output(module, args, out) -> None:
        seen["out"] = out[0] if isinstance(out, tuple) else out  # Falcon's and BLOOM's layers return tuples

    first = tiny.layers[0].register_forward_pre_hook(keep_input)
    last = tiny.layers[-1].register_forward_hook(keep_output)
    ids = prompt_ids()
    try:
        with torch.no_grad():
            logits = tiny.model(ids).logits
    finally:
        first.remove()
        last.remove()
    with torch.no_grad():
        torch.testing.assert_close(tiny.parts.embed(ids), seen["in"], rtol=0, atol=0)
        torch.testing.assert_close(tiny.parts.logits(seen["out"]), logits, rtol=0, atol=1e-6)


def test_deep_prompt_grads_match_transformers(tiny: TinyModel):
    ids = prompt_ids(length=12)
    num_blocks, hidden_size, prefix = len(tiny.layers), tiny.model.config.hidden_size, 3
    deep_prompts = torch.randn(num_blocks, 1, prefix, hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5

    # Reference: transformers' model with each prompt added before its decoder layer.
    reference = deep_prompts.clone().requires_grad_(True)

    def adder(i: int):
        def pre_hook(module, args):
            hidden = args[0]
            return (torch.cat([hidden[:, :prefix] + reference[i], hidden[:, prefix:]], dim=1),) + tuple(args[1:])
        return pre_hook

    handles = [layer.register_forward_pre_hook(adder(i)) for i, layer in enumerate(tiny.layers)]
    try:
        loss = next_token_loss(tiny.model(ids).logits, ids)
    finally:
        for handle in handles:
            handle.remove()
    (expected,) = torch.autograd.grad(loss, reference)

    span_kwargs = [{"deep_prompts": deep_prompts[span.start: span.end]} for span in tiny.spans]
    out, inputs = chained_forward(tiny.spans, tiny.parts.embed(ids), span_kwargs)
    out.requires_grad_(True)
    swarm_loss = next_token_loss(tiny.parts.logits(out), ids)
    torch.testing.assert_close(swarm_loss, loss, rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(swarm_loss, out)
    _, span_grads = chained_backward(tiny.spans, inputs, grad_out, span_kwargs)
    actual = torch.cat([g.deep_prompts for g in span_grads])

    assert expected.abs().amax(dim=(1, 2, 3)).min() > 0, "every block's prompt must get a gradient"
    assert_grads_close(actual, expected)


def test_lora_grads_match_peft(tiny: TinyModel):
    """LoRA on the family's default targets (its fused projections for Falcon, BLOOM, Phi-3)."""
    from peft import LoraConfig, get_peft_model

    ids = prompt_ids(length=12)
    targets = list(tiny.family.default_lora_targets)
    method = LoRA(rank=RANK, alpha=ALPHA, targets=targets)
    generator = torch.Generator().manual_seed(0)
    sets = []
    for span in tiny.spans:
        shapes = method.tensor_shapes(span.layers[0])
        sets.append(AdapterSet(method, {
            f"{span.start + i}.{name}": torch.randn(shape, generator=generator) * 0.1
            for i in range(span.length) for name, shape in shapes.items()
        }))

    # Reference: PEFT on a copy of the whole model, given the same A and B.
    peft_model = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=[t.rsplit(".", 1)[-1] for t in targets], lora_dropout=0.0))
    base = peft_model.base_model.model
    peft_params = {}
    for adapters in sets:
        for name, tensor in adapters.tensors.items():
            block, rest = name.split(".", 1)
            path, part = rest.rsplit(".", 1)
            weight = getattr(base.get_submodule(f"{tiny.family.layers_prefix}.{block}.{path}"), part)["default"].weight
            with torch.no_grad():
                weight.copy_(tensor)
            peft_params[name] = weight
    loss = next_token_loss(peft_model(input_ids=ids).logits, ids)
    expected = dict(zip(peft_params, torch.autograd.grad(loss, list(peft_params.values()))))

    hidden, inputs = tiny.parts.embed(ids), []
    with torch.no_grad():
        for span, adapters in zip(tiny.spans, sets):
            inputs.append(hidden)
            hidden = span(SpanInputs(hidden, adapters=[adapters]))
    hidden.requires_grad_(True)
    swarm_loss = next_token_loss(tiny.parts.logits(hidden), ids)
    torch.testing.assert_close(swarm_loss, loss, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(swarm_loss, hidden)
    actual = {}
    for span, adapters, span_input in reversed(list(zip(tiny.spans, sets, inputs))):
        span_grads = span.backward(SpanInputs(span_input, adapters=[adapters]), grad)
        grad = span_grads.hidden_states
        actual.update(span_grads.adapters[0])

    assert set(actual) == set(expected) and len(actual) == len(tiny.layers) * 2 * len(targets)
    for name, expected_grad in expected.items():
        assert expected_grad.abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected_grad, rtol=1e-3,
                                   atol=1e-4 * expected_grad.abs().max().item(), msg=name)


def test_mixtral_loads_from_either_expert_layout(tmp_path: Path, spans_forward):
    """Checkpoints keep one linear per expert (what save_pretrained writes); a folder holding the
    layer's own stacked layout loads to the same span."""
    tiny = TinyModel("mixtral", tmp_path / "per_expert")
    assert any(".block_sparse_moe.experts.0.w1." in key for key in tiny.checkpoint.weight_files)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    tiny.model.config.save_pretrained(stacked)
    save_file({k: t.contiguous() for k, t in tiny.model.state_dict().items()}, stacked / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in json.dumps(list(resolve_checkpoint(stacked).weight_files))

    span = load_span(resolve_checkpoint(stacked), 0, 3)
    hidden = torch.randn(1, 6, tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(span(SpanInputs(hidden)), spans_forward(tiny.spans, hidden), rtol=0, atol=0)


def test_bidirectional_gemma_is_refused():
    config = Gemma3TextConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=128, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        get_family(config)
