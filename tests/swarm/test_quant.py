"""swarm.quant on blocks [0, 4) of the default model: a quantized span must compute exactly what
a float span holding its dequantized weights computes (forward, backward by recomputation with
deep prompts and LoRA, inference with a KV cache), stay close to full precision, and hold less
memory. Tolerances against full precision are measured on these blocks and stated per test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.blocks import SpanInputs
from swarm.checkpoint import Checkpoint
from swarm.loading import load_span
from swarm.quant import (Int8Linear, QuantizationError, bitsandbytes_installed, check_quant, quantize_layers,
                         weight_bytes)
from swarm.tuning import AdapterSet, LoRA

SPAN = (0, 4)
needs_bitsandbytes = pytest.mark.skipif(not bitsandbytes_installed(), reason="needs bitsandbytes (swarmlm[quant])")
QUANTS = ["int8", pytest.param("nf4", marks=needs_bitsandbytes)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def dequantized(module: nn.Module) -> torch.Tensor:
    """The float weight a quantized linear multiplies by."""
    if isinstance(module, Int8Linear):
        return module.dequantized_weight(torch.float32)
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


@pytest.fixture(scope="module")
def full(smollm2: Checkpoint):
    return load_span(smollm2, *SPAN)


@pytest.fixture(scope="module")
def quantized(smollm2: Checkpoint) -> dict:
    """quant -> (quantized span, float span with the dequantized weights)."""
    spans = {}
    for quant in ("int8", "nf4"):
        if quant == "nf4" and not bitsandbytes_installed():
            continue
        span, twin = load_span(smollm2, *SPAN), load_span(smollm2, *SPAN)
        assert quantize_layers(span.layers, quant) == 7 * (SPAN[1] - SPAN[0])  # q k v o gate up down
        for name, module in span.layers.named_modules():
            if isinstance(module, nn.Linear):
                twin.layers.get_submodule(name).weight.data = dequantized(module)
        spans[quant] = span, twin
    return spans


@pytest.fixture(scope="module")
def inputs(smollm2_parts, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is a city where people", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    hidden = smollm2_parts.embed(ids)
    grad = torch.randn(hidden.shape, generator=generator)
    prompts = torch.randn(SPAN[1] - SPAN[0], 1, 3, hidden.shape[-1], generator=generator) * 0.05
    return hidden, grad, prompts


def lora_set(span) -> AdapterSet:
    lora = LoRA(rank=4)
    generator = torch.Generator().manual_seed(2)
    shapes = lora.tensor_shapes(span.layers[0])
    return AdapterSet(lora, {f"{block}.{name}": torch.randn(shape, generator=generator) * 0.05
                             for block in range(*SPAN) for name, shape in shapes.items()})


# --- the quantized layers compute with their dequantized weights, exactly ----------------------------


def test_int8_codes_are_within_half_a_step_of_the_weight():
    linear = nn.Linear(192, 40, bias=True)
    quantized = Int8Linear.from_linear(linear)
    steps = quantized.scales.repeat_interleave(64, dim=1)  # groups of 64 inputs
    assert quantized.codes.dtype == torch.int8 and quantized.scales.shape == (40, 3)
    assert ((quantized.dequantized_weight(torch.float32) - linear.weight).abs() <= steps / 2 + 1e-7).all()
    odd = Int8Linear.from_linear(nn.Linear(50, 8))  # 50 inputs: not a multiple of 64, one scale per row
    assert odd.scales.shape == (8, 1)
    x = torch.randn(2, 3, 192, requires_grad=True)
    out = quantized(x)
    expected = torch.nn.functional.linear(x, quantized.dequantized_weight(torch.float32), linear.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, quantized.dequantized_weight(torch.float32).sum(0).expand_as(x))


@pytest.mark.parametrize("quant", QUANTS)
def test_forward_and_backward_equal_the_dequantized_span(quant, quantized, inputs):
    span, twin = quantized[quant]
    hidden, grad, prompts = inputs
    adapters = [lora_set(span)]
    both_take = SpanInputs(hidden, deep_prompts=prompts, adapters=adapters)
    with torch.no_grad():
        torch.testing.assert_close(span(both_take), twin(both_take), rtol=1e-4, atol=1e-4)
    actual = span.backward(both_take, grad)
    expected = twin.backward(both_take, grad)
    torch.testing.assert_close(actual.hidden_states, expected.hidden_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual.deep_prompts, expected.deep_prompts, rtol=1e-4, atol=1e-4)
    for name, value in expected.adapters[0].items():
        torch.testing.assert_close(actual.adapters[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert actual.adapters[0]["0.self_attn.q_proj.lora_B"].abs().sum() > 0  # LoRA hooked the quantized linears


# --- and stay close to full precision ------------------------------------------------------------------

# Measured on blocks [0, 4), [4, 8) and [10, 14) of the default model: relative error of the
# outputs int8 0.3-0.5 %, nf4 4-6 %; of the gradients int8 1.3-3.2 %, nf4 21-41 %.
FORWARD_TOLERANCE = {"int8": 0.02, "nf4": 0.15}
GRADIENT_TOLERANCE = {"int8": 0.08, "nf4": 0.6}


@pytest.mark.parametrize("quant", QUANTS)
def test_close_to_full_precision(quant, quantized, full, inputs):
    span, _ = quantized[quant]
    hidden, grad, prompts = inputs
    adapters = [lora_set(span)]
    with torch.no_grad():
        error = relative_error(span(SpanInputs(hidden, deep_prompts=prompts)),
                               full(SpanInputs(hidden, deep_prompts=prompts)))
    assert error < FORWARD_TOLERANCE[quant]
    actual = span.backward(SpanInputs(hidden, deep_prompts=prompts, adapters=adapters), grad)
    expected = full.backward(SpanInputs(hidden, deep_prompts=prompts, adapters=adapters), grad)
    assert relative_error(actual.hidden_states, expected.hidden_states) < GRADIENT_TOLERANCE[quant]
    assert relative_error(actual.deep_prompts, expected.deep_prompts) < GRADIENT_TOLERANCE[quant]
    name = "0.self_attn.q_proj.lora_B"
    assert relative_error(actual.adapters[0][name], expected.adapters[0][name]) < GRADIENT_TOLERANCE[quant]


# Single-token steps: int8 runs the very ops of forward; bitsandbytes' nf4 takes a fused
# CPU kernel in bfloat16 for one token without grad (measured 0.3 % from forward).
STEP_TOLERANCE = {"int8": 1e-4, "nf4": 0.02}


@pytest.mark.parametrize("quant", QUANTS)
def test_inference_with_cache_matches_forward(quant, quantized, inputs):
    span, _ = quantized[quant]
    hidden, _, _ = inputs
    state = span.start_inference(batch_size=1, max_length=hidden.shape[1])
    prefill = hidden.shape[1] - 3
    outputs = [span.inference_step(state, hidden[:, :prefill])]
    outputs += [span.inference_step(state, hidden[:, i: i + 1]) for i in range(prefill, hidden.shape[1])]
    with torch.no_grad():
        expected = span(SpanInputs(hidden))
    assert state.position == hidden.shape[1]
    assert relative_error(torch.cat(outputs, dim=1), expected) < STEP_TOLERANCE[quant]


# --- memory, dtype, choices ------------------------------------------------------------------------------


@pytest.mark.parametrize("quant, of_float32", [("int8", 0.28), pytest.param("nf4", 0.14, marks=needs_bitsandbytes)])
def test_memory_drops(quant, of_float32, quantized, full):
    """Weights of blocks [0, 4): float32 14.2 MB a block, int8 3.8 (codes + a float32 scale
    per 64), nf4 1.8 (measured)."""
    span, _ = quantized[quant]
    assert weight_bytes(span.layers) < of_float32 * weight_bytes(full.layers)
    assert span.dtype == torch.float32  # the compute dtype, though the weights are integers
    assert not any(p.requires_grad for p in span.parameters())


def test_unsupported_choices_say_what_to_do(monkeypatch):
    with pytest.raises(QuantizationError, match="int4"):
        check_quant("int4", "cpu")
    monkeypatch.setattr("swarm.quant.bitsandbytes_installed", lambda: False)
    with pytest.raises(QuantizationError, match=r"pip install 'swarmlm\[quant\]'.*--quant int8"):
        check_quant("nf4", "cpu")
    check_quant("int8", "cpu")  # needs nothing


def test_peer_cli_refuses_nf4_without_bitsandbytes(monkeypatch, capsys):
    from peer.cli import main

    monkeypatch.setattr("swarm.quant.bitsandbytes_installed", lambda: False)
    assert main(["--blocks", "0:1", "--quant", "nf4", "--device", "cpu"]) == 2
    assert "needs bitsandbytes" in capsys.readouterr().err


@needs_bitsandbytes
def test_bitsandbytes_int8_runs_forward_and_backward(smollm2, full, inputs):
    """The CUDA int8 path (LLM.int8), run on CPU: what can be checked without a GPU."""
    span = load_span(smollm2, *SPAN)
    quantize_layers(span.layers, "int8", backend="bitsandbytes")
    hidden, grad, prompts = inputs
    with torch.no_grad():
        assert relative_error(span(SpanInputs(hidden)), full(SpanInputs(hidden))) < FORWARD_TOLERANCE["int8"]
    adapters = [lora_set(span)]
    both_take = SpanInputs(hidden, adapters=adapters)
    actual, expected = span.backward(both_take, grad), full.backward(both_take, grad)
    assert relative_error(actual.hidden_states, expected.hidden_states) < GRADIENT_TOLERANCE["int8"]
