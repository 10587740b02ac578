"""swarm.blocks: a stateless call (forward, backward, a kept graph's backward) runs block by
block and calls `between_blocks` between two blocks, where a peer runs other sessions' decode
steps. Run that way, with other span computations in between, the call gives the outputs and
gradients it gives alone (and those of one whole autograd graph), and the computations in
between give what they give alone: nothing of the call (adapter hooks, grad mode, saved-tensor
hooks) is attached while they run. On a tiny random Llama, one span of 4 blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.blocks import BlockSpan, SpanInputs
from swarm.models import get_family
from swarm.tuning import IA3, AdapterSet, BottleneckAdapter, LoRA, PrefixTuning

BLOCKS = 4


@pytest.fixture(scope="module")
def span() -> BlockSpan:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=BLOCKS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    family = get_family(config)
    span_config = family.span_config(0, BLOCKS)
    layers = family.build_layers(span_config)
    layers.load_state_dict(model.model.layers.state_dict())
    return BlockSpan(family, span_config, 0, BLOCKS, layers.requires_grad_(False), family.build_rotary(span_config))


def adapter_set(span: BlockSpan, method, seed: int, scale: float = 0.3) -> AdapterSet:
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"{span.start + i}.{name}": torch.randn(shape, generator=generator) * scale
               for i, layer in enumerate(span.layers) for name, shape in method.tensor_shapes(layer).items()}
    return AdapterSet(method, tensors)


def training_inputs(span: BlockSpan, kind: str) -> SpanInputs:
    """What a client trains with: every tuning method, and deep prompts (one tensor, every block)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 64, generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    if kind == "lora+prompts":
        prompts = torch.randn(BLOCKS, 2, 3, 64, generator=generator) * 0.3
        lora = LoRA(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), dropout=0.1, seed=7)
        return SpanInputs(x, mask, deep_prompts=prompts, adapters=[adapter_set(span, lora, 2)])
    if kind == "prefix+ia3":
        ia3 = adapter_set(span, IA3(), 3)
        ia3.tensors = {name: 1 + t for name, t in ia3.tensors.items()}
        return SpanInputs(x, mask, adapters=[adapter_set(span, PrefixTuning(num_virtual_tokens=3), 4), ia3])
    return SpanInputs(x, mask, adapters=[adapter_set(span, BottleneckAdapter(), 5)])


KINDS = ["lora+prompts", "prefix+ia3", "bottleneck"]


class OtherWork:
    """What runs between blocks: another session's decode step (its own LoRA) and a plain
    forward, each compared with the same computation run alone; and a check that nothing of
    the interrupted call is attached to the layers."""

    def __init__(self, span: BlockSpan) -> None:
        self.span, self.calls = span, 0
        self.lora = adapter_set(span, LoRA(rank=2, alpha=4.0), 9)
        self.plain = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(10))
        self.prompt = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(11))
        self.tokens = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(12))
        self.expected = (self.decode_step(), self.forward())
        self.grad_mode = None

    def decode_step(self) -> torch.Tensor:
        state = self.span.start_inference(1, 8, adapters=[self.lora])
        self.span.inference_step(state, self.prompt)
        return self.span.inference_step(state, self.tokens)

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.span(self.plain)

    def __call__(self) -> None:
        self.calls += 1
        hooks = [name for name, module in self.span.named_modules()
                 if module._forward_hooks or module._forward_pre_hooks]
        assert not hooks, f"the call's adapters are still attached to {hooks}"
        self.grad_mode = torch.is_grad_enabled()
        torch.testing.assert_close(self.decode_step(), self.expected[0], rtol=0, atol=0)
        torch.testing.assert_close(self.forward(), self.expected[1], rtol=0, atol=0)


def whole_graph_grads(span: BlockSpan, inputs: SpanInputs, grad: torch.Tensor):
    """Gradients through one autograd graph of the whole span (the caller's grad mode)."""
    leaves = [inputs.hidden_states.clone().requires_grad_(True)]
    prompts = None if inputs.deep_prompts is None else inputs.deep_prompts.clone().requires_grad_(True)
    adapters = [AdapterSet(a.method, {k: t.clone().requires_grad_(True) for k, t in a.tensors.items()})
                for a in inputs.adapters]
    leaves += ([prompts] if prompts is not None else []) + [t for a in adapters for t in a.tensors.values()]
    with torch.enable_grad():
        out = span(SpanInputs(leaves[0], inputs.attention_mask, deep_prompts=prompts, adapters=adapters))
        return out.detach(), torch.autograd.grad(out, leaves, grad)


def flat(grads) -> list[torch.Tensor]:
    result = [grads.hidden_states] + ([grads.deep_prompts] if grads.deep_prompts is not None else [])
    return result + [t for tensors in grads.adapters for t in tensors.values()]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_other_work_between_blocks_is_unchanged(span, kind):
    inputs = training_inputs(span, kind)
    with torch.no_grad():
        alone = span(inputs)
        other = OtherWork(span)
        between = span(inputs, between_blocks=other)
        assert other.grad_mode is False, "a no_grad caller's mode, as it was"
    assert other.calls == BLOCKS - 1
    torch.testing.assert_close(between, alone, rtol=0, atol=0)
    assert not torch.allclose(alone, span(inputs.hidden_states)), "the adapters must change the output"


@pytest.mark.parametrize("kind", KINDS)
def test_backward_with_other_work_between_blocks_equals_one_graph(span, kind):
    inputs = training_inputs(span, kind)
    grad = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(20))
    out, expected = whole_graph_grads(span, inputs, grad)

    other = OtherWork(span)
    recomputed = flat(span.backward(inputs, grad, between_blocks=other))
    assert other.calls == 2 * (BLOCKS - 1) + 1, "between the blocks of the forward, then of the backward"

    kept_other = OtherWork(span)
    hidden, graph = span.forward_with_graph(inputs, between_blocks=kept_other)
    assert kept_other.grad_mode is True, "no grad mode of the call leaks (torch's default is on)"
    torch.testing.assert_close(hidden, out, rtol=0, atol=0)
    kept = flat(graph.backward(grad, between_blocks=kept_other))
    assert kept_other.calls == 2 * (BLOCKS - 1)
    for got in (recomputed, kept):
        assert len(got) == len(expected)
        for actual, reference in zip(got, expected):
            torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in expected[1:]), "the client tensors must get gradients"


def test_a_kept_graph_counts_only_its_own_saved_tensors(span):
    """Autograd work between blocks (here another graph-keeping forward) is not counted in the
    interrupted call's kept bytes: its saved-tensor hooks are not installed in between."""
    inputs = training_inputs(span, "lora+prompts")
    _, alone = span.forward_with_graph(inputs)
    others = []

    def other_graph() -> None:
        with torch.enable_grad():
            x = torch.randn(3, 7, 64, requires_grad=True)
            others.append(span(x))  # saves activations, under no hooks of the interrupted call

    _, interrupted = span.forward_with_graph(inputs, between_blocks=other_graph)
    assert len(others) == BLOCKS - 1
    assert interrupted.nbytes == alone.nbytes
    assert alone.nbytes > 0
