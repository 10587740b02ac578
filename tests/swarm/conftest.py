"""Fixtures for the core's equivalence tests: the default model split into three spans, the
same model as transformers loads it whole, and helpers that drive spans the way a client does.

Everything is session-scoped: loading SmolLM2 takes seconds, and the tests only read it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from swarm.blocks import BlockSpan, SpanInputs
from swarm.checkpoint import Checkpoint, resolve_checkpoint
from swarm.loading import load_client_parts, load_span
from swarm.models import ClientParts

SMOLLM2_SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while these modules run. On a 2-core box shared with other
    processes, torch's parallel kernels wait at every barrier for a thread that lost its core:
    measured here, the generation tests took 4 s with one thread and 25-90 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2() -> Checkpoint:
    return resolve_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_model(smollm2: Checkpoint) -> PreTrainedModel:
    """The reference: transformers' own model, whole, fp32."""
    return own_weights(AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32)).eval()


def own_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Copies weights out of the mmapped safetensors file (which from_pretrained hands out):
    the kernel pages idle file-backed pages out here, and re-reading them makes every step
    of the reference slow. Also freezes them: tests take gradients only of their own tensors."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data = tensor.data.clone()
    return model.requires_grad_(False)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: Checkpoint):
    return AutoTokenizer.from_pretrained(smollm2.folder)


@pytest.fixture(scope="session")
def smollm2_spans(smollm2: Checkpoint) -> list[BlockSpan]:
    return [load_span(smollm2, start, end) for start, end in SMOLLM2_SPANS]


@pytest.fixture(scope="session")
def smollm2_parts(smollm2: Checkpoint) -> ClientParts:
    parts = load_client_parts(smollm2)
    parts.requires_grad_(False)
    return parts.eval()


def _spans_forward(spans: Sequence[BlockSpan], hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """Hidden states through a chain of spans, as a client sends them peer after peer."""
    for span in spans:
        hidden = span(SpanInputs(hidden, **kwargs))
    return hidden


@torch.inference_mode()
def _greedy_from_spans(
    parts: ClientParts,
    spans: Sequence[BlockSpan],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
) -> torch.Tensor:
    """Greedy decoding through the spans' KV caches: the prompt once, then one token per step.
    Each step sends only the new tokens' mask columns; the spans derive positions themselves."""
    batch, prompt_length = input_ids.shape
    states = [span.start_inference(batch, prompt_length + max_new_tokens) for span in spans]
    new_ids, new_mask, generated = input_ids, attention_mask, []
    for _ in range(max_new_tokens):
        hidden = parts.embed(new_ids)
        for span, state in zip(spans, states):
            hidden = span.inference_step(state, hidden, attention_mask=new_mask)
        new_ids = parts.logits(hidden[:, -1:]).argmax(-1)
        generated.append(new_ids)
        new_mask = None if attention_mask is None else torch.ones_like(new_ids)
    assert all(state.position == prompt_length + max_new_tokens - 1 for state in states)
    return torch.cat(generated, dim=1)


def _greedy_from_model(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      max_new_tokens: int = 32) -> torch.Tensor:
    """transformers' own greedy generate; EOS does not stop it, so every row has max_new_tokens."""
    output = model.generate(
        input_ids, attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    return output[:, input_ids.shape[1]:]


# Helpers reach the tests as fixtures, so test modules need not import conftest.


@pytest.fixture(scope="session")
def spans_forward() -> Callable:
    return _spans_forward


@pytest.fixture(scope="session")
def greedy_from_spans() -> Callable:
    return _greedy_from_spans


@pytest.fixture(scope="session")
def greedy_from_model() -> Callable:
    return _greedy_from_model
