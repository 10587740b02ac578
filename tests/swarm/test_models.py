"""swarm.models: every claimed model type, as a tiny random model saved like any Hugging Face
folder, split into spans, gives transformers' logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, BloomConfig, FalconConfig, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          MistralConfig, MixtralConfig, Phi3Config, PreTrainedModel, Qwen2Config, Qwen3Config)

from swarm.checkpoint import Checkpoint, resolve_checkpoint
from swarm.loading import load_client_parts, load_span
from swarm.models import FAMILIES, UnsupportedModelError, get_family

# GQA (4 query heads share 2 KV heads); a larger init than usual so that random logits are
# peaked and greedy choices are not decided by rounding noise.
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING_WINDOW = 4  # much shorter than the 10-token prompt + 16 new tokens
# What Falcon's and BLOOM's configs call by the same names (their MLP and KV-head sizes are named otherwise).
NAMED_ALIKE = {k: v for k, v in COMMON.items() if k not in ("intermediate_size", "num_key_value_heads",
                                                            "max_position_embeddings")}

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=4, **COMMON),
    "mistral": lambda: MistralConfig(num_hidden_layers=5, sliding_window=SLIDING_WINDOW, **COMMON),
    # Qwen 2 with its per-layer attention types: full for layers 0-2, sliding for 3-5, so a span
    # boundary falls between the kinds and another span holds both.
    "qwen2": lambda: Qwen2Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                 max_window_layers=3, **COMMON),
    # Qwen 3: q/k norms, a head_dim other than hidden/heads, and the LM head tied to the embeddings.
    "qwen3": lambda: Qwen3Config(num_hidden_layers=5, head_dim=32, tie_word_embeddings=True, **COMMON),
    # Mixture of experts: 4 experts, 2 per token; saved with one linear per expert, as on the Hub.
    "mixtral": lambda: MixtralConfig(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=SLIDING_WINDOW, **COMMON),
    # Gemma 3: sliding and full layers alternating, so each span starts with another kind; logits soft-capped.
    # (Tiny random models with tied heads, Gemma's, Falcon's and BLOOM's, repeat one token forever.)
    "gemma3_text": lambda: Gemma3TextConfig(
        num_hidden_layers=4, head_dim=16, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, final_logit_softcapping=30.0,
        tie_word_embeddings=False, **COMMON),
    # Falcon's new decoder architecture (two LayerNorms, grouped KV heads, rotary), and the original one with ALiBi.
    "falcon": lambda: FalconConfig(num_hidden_layers=3, new_decoder_architecture=True, num_kv_heads=2,
                                   tie_word_embeddings=False, **NAMED_ALIKE),
    "falcon-alibi": lambda: FalconConfig(num_hidden_layers=3, alibi=True, multi_query=True, parallel_attn=False,
                                         bias=True, tie_word_embeddings=False, **NAMED_ALIKE),
    "bloom": lambda: BloomConfig(n_layer=3, n_head=4, tie_word_embeddings=False, **NAMED_ALIKE),
    "phi3": lambda: Phi3Config(num_hidden_layers=3, sliding_window=SLIDING_WINDOW, **COMMON),
}
SPLITS = {"llama": [0, 2, 4], "mistral": [0, 2, 3, 5], "qwen2": [0, 2, 5, 6], "qwen3": [0, 3, 5], "mixtral": [0, 1, 3],
          "gemma3_text": [0, 1, 3, 4], "falcon": [0, 2, 3], "falcon-alibi": [0, 1, 3], "bloom": [0, 1, 3],
          "phi3": [0, 2, 3]}


def tiny_model(name: str) -> PreTrainedModel:
    """The tiny random model `TINY_CONFIGS[name]`, the same on every call."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]()).eval()
    with torch.no_grad():  # norms start all alike (ones, zeros): a loader mixing them up would pass unseen
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


pytestmark = pytest.mark.compat  # every family leans on its transformers layers, masks and cache


class TinyModel:
    def __init__(self, model_type: str, folder: Path):
        self.model = tiny_model(model_type)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.checkpoint: Checkpoint = resolve_checkpoint(folder)
        cuts = SPLITS[model_type]
        self.spans = [load_span(self.checkpoint, start, end) for start, end in zip(cuts, cuts[1:])]
        self.parts = load_client_parts(self.checkpoint)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory) -> TinyModel:
    return TinyModel(request.param, tmp_path_factory.mktemp(request.param))


def prompt_ids(batch: int = 1, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_claimed_type_is_registered():
    claimed = {"llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma3_text", "falcon", "bloom", "phi3"}
    assert claimed <= set(FAMILIES)


def test_logits_match_transformers(tiny: TinyModel, spans_forward):
    ids = prompt_ids(batch=2)
    with torch.no_grad():
        expected = tiny.model(ids).logits
        actual = tiny.parts.logits(spans_forward(tiny.spans, tiny.parts.embed(ids)))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_greedy_from_span_caches_matches_generate(tiny: TinyModel, greedy_from_spans, greedy_from_model):
    ids = prompt_ids()
    expected = greedy_from_model(tiny.model, ids, max_new_tokens=16)
    assert greedy_from_spans(tiny.parts, tiny.spans, ids, max_new_tokens=16).tolist() == expected.tolist()


def test_left_padded_batch_matches_generate(tiny: TinyModel, greedy_from_spans, greedy_from_model):
    ids = prompt_ids(batch=2, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = COMMON["pad_token_id"]
    expected = greedy_from_model(tiny.model, ids, mask, max_new_tokens=16)
    assert greedy_from_spans(tiny.parts, tiny.spans, ids, mask, max_new_tokens=16).tolist() == expected.tolist()


def test_rollback_past_the_sliding_window(tiny: TinyModel):
    """A session rewinds to any position, also where sliding-window layers have moved past it."""
    hidden = torch.randn(1, 12, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    span = tiny.spans[-1]
    state = span.start_inference(1, 16)
    span.inference_step(state, hidden[:, :4])
    outputs = [span.inference_step(state, hidden[:, i: i + 1]) for i in range(4, 12)]
    again = span.inference_step(state, hidden[:, 5:12], position=5)
    torch.testing.assert_close(again, torch.cat(outputs[1:], dim=1), rtol=1e-4, atol=1e-4)
    assert state.position == 12


def test_the_sliding_window_is_in_effect(tiny: TinyModel, spans_forward):
    """Guards the tests above: with a window, logits past it differ from full attention."""
    if getattr(tiny.model.config, "sliding_window", None) is None:
        pytest.skip("no sliding window in this config")
    ids = prompt_ids(length=12)
    # The same layers with a window longer than the text (rather than none: Gemma's sliding
    # layers also differ from its full ones in their rotary base).
    full = AutoModelForCausalLM.from_config(type(tiny.model.config)(**{
        **tiny.model.config.to_dict(), "sliding_window": 1024}))
    full.load_state_dict(tiny.model.state_dict())
    with torch.no_grad():
        windowed = tiny.parts.logits(spans_forward(tiny.spans, tiny.parts.embed(ids)))
        unwindowed = full.eval()(ids).logits
    torch.testing.assert_close(windowed[:, :SLIDING_WINDOW], unwindowed[:, :SLIDING_WINDOW], rtol=0, atol=1e-5)
    assert (windowed[:, SLIDING_WINDOW:] - unwindowed[:, SLIDING_WINDOW:]).abs().max() > 1e-2


def test_unsupported_model_type_lists_supported_ones(tmp_path: Path):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    checkpoint = resolve_checkpoint(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"model type 'gpt2' is not supported; supported types: bloom, "
                                                    r"falcon, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen3"):
        load_span(checkpoint, 0, 1)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        get_family(checkpoint.config)
