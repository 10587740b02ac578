"""swarm.tuning's IA3, prefix tuning and bottleneck adapters, on a tiny random Llama split
into two spans the way peers hold it: each method's gradients equal PEFT's (or, for
bottleneck adapters, a reference built from plain modules and hooks), a prefix generates
as PEFT's does, exported files load into PEFT / a plain model with the same logits, Adam
halves the loss in 30 steps, and bad tensors or settings are refused clearly.

The real model through real peers is tests/integration/test_swarm_tuning_methods.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import IA3Config, PeftModel, PrefixTuningConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.blocks import BlockSpan, SpanInputs
from swarm.models import get_family
from swarm.tuning import (AdapterError, AdapterSet, BottleneckAdapter, ExportTarget, IA3, LoRA, PrefixTuning,
                          method_from_json)
from swarm.tuning.bottleneck import attach_to_model
from swarm.tuning.prefix import flatten_prefix
from tests.reference import greedy_without_cache

BOUNDS = [(0, 2), (2, 4)]
TARGET = ExportTarget("model.layers", "tiny-llama")


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def spans(tiny) -> list[BlockSpan]:
    """The tiny model's layers as peers hold them: each span its own layers, indexed from 0."""
    family = get_family(tiny.config)
    spans = []
    for start, end in BOUNDS:
        config = family.span_config(start, end)
        layers = family.build_layers(config)
        for i, layer in enumerate(layers):
            layer.load_state_dict(tiny.model.layers[start + i].state_dict())
        spans.append(BlockSpan(family, config, start, end, layers.requires_grad_(False), family.build_rotary(config)))
    return spans


@pytest.fixture(scope="module")
def family(tiny):
    return get_family(tiny.config)


IDS = torch.tensor([[5, 17, 42, 8, 63, 21, 9, 77, 30]])


def random_tensors(family, method, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Every block's tensors, random and far from the method's identity start."""
    torch.manual_seed(seed)
    tensors = {}
    for block in range(family.num_blocks):
        with torch.device("meta"):  # the block as the family builds it, for its tensors' shapes only
            layer = family.build_layers(family.span_config(block, block + 1))[0]
        tensors.update({f"{block}.{name}": torch.empty(shape) for name, shape in method.tensor_shapes(layer).items()})
    for name, tensor in tensors.items():
        method.init_tensor(name, tensor)
    return {name: (t + torch.randn_like(t) * scale).detach() for name, t in tensors.items()}


def span_set(span: BlockSpan, method, tensors: dict[str, torch.Tensor]) -> AdapterSet:
    return AdapterSet(method, {n: t for n, t in tensors.items() if span.start <= int(n.split(".")[0]) < span.end})


def logits_of(tiny, hidden: torch.Tensor) -> torch.Tensor:
    return tiny.lm_head(tiny.model.norm(hidden))


def spans_logits(tiny, spans, ids, method=None, tensors=None, **step) -> torch.Tensor:
    hidden = tiny.model.embed_tokens(ids)
    for span in spans:
        hidden = span(SpanInputs(hidden, adapters=[span_set(span, method, tensors)] if method else [], **step))
    return logits_of(tiny, hidden)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def swarm_grads(tiny, spans, ids, method, tensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and tensor grads the way a client gets them from peers: forward span by span,
    then each span's Backward in reverse."""
    hidden, inputs = tiny.model.embed_tokens(ids), []
    with torch.no_grad():
        for span in spans:
            inputs.append(hidden)
            hidden = span(SpanInputs(hidden, adapters=[span_set(span, method, tensors)]))
    hidden.requires_grad_(True)
    loss = lm_loss(logits_of(tiny, hidden), ids)
    (grad,) = torch.autograd.grad(loss, hidden)
    grads = {}
    for span, span_input in reversed(list(zip(spans, inputs))):
        adapters = span_set(span, method, tensors)
        result = span.backward(SpanInputs(span_input, adapters=[adapters]), grad)
        assert set(result.adapters[0]) == set(adapters.tensors)
        grads.update(result.adapters[0])
        grad = result.hidden_states
    return loss, grads


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert expected.abs().max() > 0, f"{name}: the reference gradient is zero, the check would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-5 * expected.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


# --- IA3 ----------------------------------------------------------------------------------------


def peft_ia3(base: nn.Module, tensors) -> nn.Module:
    """PEFT's IA3 around `base` (changed in place), holding our tensors."""
    model = get_peft_model(base, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(tensors[name.split("layers.")[1].replace(".default", "")])
    return model


def test_ia3_grads_match_peft(tiny, spans, family):
    method = IA3()
    tensors = random_tensors(family, method, seed=1)
    assert tensors["0.mlp.down_proj.ia3_l"].shape == (1, 96) and tensors["3.self_attn.k_proj.ia3_l"].shape == (32, 1)
    reference = peft_ia3(copy.deepcopy(tiny), tensors)
    expected_loss = lm_loss(reference(input_ids=IDS).logits, IDS)
    params = {n.split("layers.")[1].replace(".default", ""): p for n, p in reference.named_parameters() if "ia3_l" in n}
    expected = dict(zip(params, torch.autograd.grad(expected_loss, list(params.values()))))
    loss, grads = swarm_grads(tiny, spans, IDS, method, tensors)
    torch.testing.assert_close(loss, expected_loss)
    assert set(grads) == set(expected) and len(grads) == 4 * 3
    for name in expected:
        assert_grads_close(grads[name], expected[name], name)


# --- prefix tuning ------------------------------------------------------------------------------


def peft_prefix(base: nn.Module, flat: torch.Tensor | None, projection: int | None = None,
                num_virtual_tokens: int = 3) -> nn.Module:
    """PEFT's prefix tuning around `base`, holding our keys/values (as PEFT's flat embedding)."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                prefix_projection=projection is not None, encoder_hidden_size=projection)
    model = get_peft_model(base, config)
    if flat is not None:
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(flat)
    return model


def test_prefix_grads_match_peft(tiny, spans, family):
    method = PrefixTuning(num_virtual_tokens=3)
    tensors = random_tensors(family, method, seed=2, scale=1.0)
    assert tensors["1.prefix_keys"].shape == (2, 3, 16)  # (kv heads, virtual tokens, head dim)
    reference = peft_prefix(copy.deepcopy(tiny), flatten_prefix(tensors))
    weight = reference.prompt_encoder["default"].embedding.weight
    expected_loss = lm_loss(reference(input_ids=IDS).logits, IDS)
    (expected,) = torch.autograd.grad(expected_loss, [weight])
    loss, grads = swarm_grads(tiny, spans, IDS, method, tensors)
    torch.testing.assert_close(loss, expected_loss)
    assert (loss - lm_loss(spans_logits(tiny, spans, IDS), IDS)).abs() > 1e-3, "the prefix must change the loss"
    assert_grads_close(flatten_prefix(grads), expected, "prefix")


def greedy_through_spans(tiny, spans, ids, mask, method, tensors, new_tokens: int) -> torch.Tensor:
    states = [span.start_inference(ids.shape[0], ids.shape[1] + new_tokens, adapters=[span_set(span, method, tensors)])
              for span in spans]
    step_ids, step_mask, generated = ids, mask, []
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = tiny.model.embed_tokens(step_ids)
            for span, state in zip(spans, states):
                hidden = span.inference_step(state, hidden, attention_mask=step_mask)
            step_ids = logits_of(tiny, hidden[:, -1:]).argmax(-1)
            step_mask = torch.ones_like(step_ids)
            generated.append(step_ids)
    assert states[0].position == ids.shape[1] + new_tokens - 1, "the position counts only the session's tokens"
    assert states[0].cache.get_seq_length() == 3 + states[0].position, "the prefix sits in the cache ahead of them"
    return torch.cat(generated, dim=1)


@pytest.mark.compat
def test_prefix_generates_like_peft_with_padding(tiny, spans, family):
    method = PrefixTuning(num_virtual_tokens=3)
    tensors = random_tensors(family, method, seed=4, scale=1.0)
    reference = peft_prefix(copy.deepcopy(tiny), flatten_prefix(tensors)).eval()
    ids = torch.tensor([[0, 0, 5, 17, 42], [8, 63, 21, 9, 77]])  # left-padded batch
    mask = (ids != 0).long()
    ours = greedy_through_spans(tiny, spans, ids, mask, method, tensors, new_tokens=6)
    theirs = greedy_without_cache(reference, ids, mask, new_tokens=6)[:, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


@pytest.mark.compat
def test_prefix_session_matches_forward_and_rolls_back(tiny, spans, family):
    span = spans[1]
    method = PrefixTuning(num_virtual_tokens=3)
    adapters = span_set(span, method, random_tensors(family, method, seed=5, scale=1.0))
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = span(SpanInputs(hidden, adapters=[adapters]))
    state = span.start_inference(1, 8, adapters=[adapters])
    with torch.no_grad():
        first = span.inference_step(state, hidden[:, :4])
        span.inference_step(state, torch.randn(1, 2, 64))  # a branch the client abandons
        rest = span.inference_step(state, hidden[:, 4:], position=4)  # rolls back to 4 session tokens
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, rtol=1e-5, atol=1e-5)
    assert state.position == 6 and state.cache.get_seq_length() == 9


# --- bottleneck adapters ------------------------------------------------------------------------


class ReferenceAdapter(nn.Module):
    """A bottleneck adapter as the papers draw it, in plain modules."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        super().__init__()
        bottleneck, hidden = tensors[f"{where}.adapter_down.weight"].shape
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            for part, linear in (("down", self.down), ("up", self.up)):
                linear.weight.copy_(tensors[f"{where}.adapter_{part}.weight"])
                linear.bias.copy_(tensors[f"{where}.adapter_{part}.bias"])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


def with_reference_adapters(model, tensors, locations) -> tuple[list, dict[str, ReferenceAdapter]]:
    """Plain-module adapters hooked onto a transformers model's layers; the hook handles and
    the modules by "{layer}.{location}"."""
    handles, modules = [], {}
    for i, layer in enumerate(model.model.layers):
        for where in locations:
            adapter = modules[f"{i}.{where}"] = ReferenceAdapter({n.split(".", 1)[1]: t for n, t in tensors.items()
                                                                  if n.startswith(f"{i}.")}, where)

            def hook(module, args, output, adapter=adapter):
                if isinstance(output, tuple):
                    return (adapter(output[0]),) + output[1:]
                return adapter(output)

            handles.append(getattr(layer, where).register_forward_hook(hook))
    return handles, modules


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_bottleneck_grads_match_plain_modules(tiny, spans, family, placement):
    method = BottleneckAdapter(placement, reduction_factor=8)
    tensors = random_tensors(family, method, seed=6)
    assert tensors["0.mlp.adapter_down.weight"].shape == (8, 64)
    assert ("0.self_attn.adapter_up.bias" in tensors) == (placement == "houlsby")
    handles, modules = with_reference_adapters(tiny, tensors, method.locations)
    try:
        params = {f"{key}.adapter_{part}.{kind}": getattr(getattr(module, part), kind)
                  for key, module in modules.items() for part in ("down", "up") for kind in ("weight", "bias")}
        expected_loss = lm_loss(tiny(input_ids=IDS).logits, IDS)
        expected = dict(zip(params, torch.autograd.grad(expected_loss, list(params.values()))))
    finally:
        for handle in handles:
            handle.remove()
    loss, grads = swarm_grads(tiny, spans, IDS, method, tensors)
    torch.testing.assert_close(loss, expected_loss)
    assert set(grads) == set(expected)
    for name in expected:
        assert_grads_close(grads[name], expected[name], name)


# --- exported files -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [IA3(), PrefixTuning(num_virtual_tokens=3)], ids=["ia3", "prefix"])
@pytest.mark.compat
def test_peft_files_load_into_peft(tiny, spans, family, method, tmp_path):
    tensors = random_tensors(family, method, seed=7, scale=0.5)
    assert method.save_files(tmp_path, tensors, TARGET)
    reference = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(spans_logits(tiny, spans, IDS, method, tensors), reference(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)
    again, loaded = type(method).load_files(tmp_path, TARGET)
    layer = spans[0].layers[0]
    assert again.tensor_shapes(layer) == method.tensor_shapes(layer) and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_bottleneck_files_load_into_a_plain_model(tiny, spans, family, tmp_path):
    method = BottleneckAdapter("houlsby", reduction_factor=4, nonlinearity="gelu")
    tensors = random_tensors(family, method, seed=8)
    method.save_files(tmp_path, tensors, TARGET)
    handles = attach_to_model(tiny, tmp_path)
    try:
        with torch.no_grad():
            expected = tiny(input_ids=IDS).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(spans_logits(tiny, spans, IDS, method, tensors), expected, rtol=1e-5, atol=1e-5)
        assert (expected - tiny(input_ids=IDS).logits).abs().max() > 1e-3


# --- refusals -----------------------------------------------------------------------------------


def test_bad_tensors_are_refused(spans, family):
    span = spans[0]
    hidden = torch.randn(1, 3, 64)
    ia3 = IA3()
    good = span_set(span, ia3, random_tensors(family, ia3, seed=9)).tensors
    with pytest.raises(AdapterError, match=r"ia3 tensor 1\.mlp\.down_proj\.ia3_l has shape \(96, 1\), expected \(1, 96\)"):
        span(SpanInputs(hidden,
                        adapters=[AdapterSet(ia3, dict(good, **{"1.mlp.down_proj.ia3_l": torch.ones(96, 1)}))]))
    prefix = PrefixTuning(num_virtual_tokens=3)
    keys = span_set(span, prefix, random_tensors(family, prefix, seed=9)).tensors
    with pytest.raises(AdapterError, match=r"prefix tensor 0\.prefix_values must be floating point"):
        span(SpanInputs(hidden,
                        adapters=[AdapterSet(prefix, dict(keys, **{"0.prefix_values": torch.ones(2, 3, 16).long()}))]))
    with pytest.raises(AdapterError, match=r"expected \(2, 3, 16\)"):
        span.start_inference(1, 4, adapters=[AdapterSet(prefix, dict(keys, **{"1.prefix_keys": torch.ones(2, 4, 16)}))])
    other = PrefixTuning(num_virtual_tokens=2)
    with pytest.raises(AdapterError, match="at most one method may put keys/values in the cache"):
        span(SpanInputs(hidden, adapters=[AdapterSet(prefix, keys),
                                          span_set(span, other, random_tensors(family, other, seed=9))]))
    assert not any(hooks for layer in span.layers for m in layer.modules()
                   for hooks in (m._forward_hooks, m._forward_pre_hooks)), "a refused call leaves no hooks"


@pytest.mark.parametrize("name, settings, message", [
    ("prefix", '{"num_virtual_tokens": 0}', r"num_virtual_tokens must be an integer in \[1, 512\], got 0"),
    ("prefix", '{"num_virtual_tokens": 1e400}', r"num_virtual_tokens must be an integer in \[1, 512\], got inf"),
    ("prefix", '{"projection": -3}', r"projection must be an integer in \[1, 65536\], got -3"),
    ("bottleneck", '{"placement": "sideways"}', r"placement must be one of \['houlsby', 'pfeiffer'\]"),
    ("bottleneck", '{"reduction_factor": 0}', r"reduction_factor must be an integer in \[1, 65536\], got 0"),
    ("bottleneck", '{"placement": ["houlsby"]}', "placement must be one of"),
    ("bottleneck", '{"nonlinearity": "softmax"}', "nonlinearity must be one of"),
    ("ia3", '{"targets": ["k_proj"], "feedforward": ["down_proj"]}', "feedforward modules .* must also be targets"),
    ("ia3", '{"targets": [3]}', "targets must be a list of module names"),
    ("lora", '{"targets": "q_proj", "seed": -1}', r"seed must be None or an integer"),
    ("ia3", '{"scale": 2}', "bad ia3 settings"),
])
def test_bad_settings_are_refused(name, settings, message):
    with pytest.raises(AdapterError, match=message):
        method_from_json(name, settings)


def test_settings_travel_and_limits_hold(spans):
    for method in (IA3(targets=["v_proj", "down_proj"], feedforward=["down_proj"]), PrefixTuning(5, projection=7),
                   BottleneckAdapter("houlsby", 4, "tanh")):
        assert method_from_json(method.name, method.to_json()).settings() == method.settings()
    with pytest.raises(AdapterError, match="matches no linear layer"):
        IA3(targets=["w_proj"], feedforward=[]).tensor_shapes(spans[0].layers[0])
    tight = BottleneckAdapter(reduction_factor=1)
    tight.max_elements_per_block = 1000
    with pytest.raises(AdapterError, match="reduction factor 1 is too large for these layers"):
        tight.tensor_shapes(spans[0].layers[0])
