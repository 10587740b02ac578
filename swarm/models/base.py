"""What every model family must say: how a config splits into client parts and blocks,
and how a span of blocks runs.

The defaults here describe the Llama recipe (pre-norm decoder layers, rotary positions
computed once per forward, RMSNorm before the LM head), which most decoder-only families
in transformers follow; a family overrides only what differs. Blocks are always the
library's own decoder-layer classes: we build them, load their weights and call them.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Container
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.compat import cache_kwargs

# Called before block i (global index) with the hidden states entering it; returns what
# actually enters the block (deep prompts add themselves here).
BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]


class ClientParts(nn.Module):
    """What the client holds: token embeddings, the final norm and the LM head, plus what
    some families do around them (Gemma scales embeddings and soft-caps logits, BLOOM
    normalises embeddings before the first block)."""

    def __init__(self, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear, embed_scale: float = 1.0,
                 input_norm: nn.Module | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.embed_scale = embed_scale
        self.input_norm = input_norm
        self.logit_softcap = logit_softcap

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden states that enter block 0."""
        embeds = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            # In the embeddings' dtype, as Gemma does: in bfloat16 the scale itself rounds.
            embeds = embeds * torch.tensor(self.embed_scale).to(embeds.dtype)
        return self.input_norm(embeds) if self.input_norm is not None else embeds

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.capped(self.lm_head(self.norm(hidden_states)))

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's output as the family hands it on (soft-capped, for Gemma)."""
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a layer lives in a checkpoint: under one key, or split over several
    keys that ``combine`` joins (a layout transformers converts on load, e.g. Mixtral's
    per-expert matrices that its layer holds stacked)."""

    keys: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    def assemble(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [tensors[key] for key in self.keys]
        return self.combine(parts) if self.combine is not None else parts[0]


class ModelFamily:
    """How one family of decoder-only models is split and run. One instance per config."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Class-name prefix in transformers' modeling module, per model type ("llama" -> "Llama").
    class_prefixes: ClassVar[dict[str, str]] = {}
    # transformers' module folder, where it is not named after the model type (gemma3_text -> gemma3).
    modeling_modules: ClassVar[dict[str, str]] = {}
    # Model types whose forward applies config.sliding_window to every layer (no layer_types).
    sliding_window_model_types: ClassVar[tuple[str, ...]] = ()
    # What transformers picks for the family's layers: sdpa where the family supports it.
    attn_implementation: ClassVar[str] = "sdpa"
    # LoRA targets a client uses when the user names none (the family's attention projections).
    default_lora_targets: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.v_proj")

    layers_prefix: ClassVar[str] = "model.layers"
    embed_key: ClassVar[str] = "model.embed_tokens.weight"
    norm_prefix: ClassVar[str] = "model.norm"
    lm_head_key: ClassVar[str] = "lm_head.weight"
    input_norm_prefix: ClassVar[str | None] = None  # a norm on the embeddings (BLOOM)

    def __init__(self, config: PretrainedConfig):
        self.config = config

    # --- the pieces, as transformers defines them -------------------------------------------

    def _modeling_class(self, suffix: str) -> type:
        model_type = self.config.model_type
        folder = self.modeling_modules.get(model_type, model_type)
        module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
        return getattr(module, f"{self.class_prefixes[model_type]}{suffix}")

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    def span_config(self, start: int, end: int) -> PretrainedConfig:
        """A copy of the config describing only blocks [start, end), so the library's layers,
        caches and masks index them 0..n-1 (their KV cache is the span's, not the model's)."""
        span = copy.deepcopy(self.config)
        span.num_hidden_layers = end - start
        if getattr(span, "layer_types", None) is not None:
            span.layer_types = list(self.config.layer_types[start:end])
        if getattr(span, "_attn_implementation", None) is None:
            span._attn_implementation = self.attn_implementation
        return span

    def build_layers(self, span_config: PretrainedConfig) -> nn.ModuleList:
        layer_class = self._modeling_class("DecoderLayer")
        return nn.ModuleList(layer_class(span_config, layer_idx=i) for i in range(span_config.num_hidden_layers))

    def build_rotary(self, span_config: PretrainedConfig) -> nn.Module:
        return self._modeling_class("RotaryEmbedding")(config=span_config)

    def new_cache(self, span_config: PretrainedConfig) -> Cache:
        # Every layer keeps all its keys/values, sliding-window layers included (their masks
        # still limit what they see): a sliding layer that drops old tokens cannot be rolled
        # back past its window, and a session must be able to rewind to any position. The
        # session's max_length bounds the memory either way.
        return DynamicCache()

    def checkpoint_sources(self, layers: nn.ModuleList, start: int,
                           available: Container[str]) -> dict[str, StoredTensor]:
        """Name inside the span's ModuleList -> where the checkpoint keeps it. ``available`` holds
        the checkpoint's tensor names, for families whose checkpoints come in several layouts."""
        return {
            f"{i}.{local}": StoredTensor((f"{self.layers_prefix}.{start + i}.{local}",))
            for i, layer in enumerate(layers) for local in layer.state_dict(keep_vars=True)
        }

    def build_client_parts(self) -> ClientParts:
        config = self.config
        embed = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx())
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        return ClientParts(embed, self.build_final_norm(), lm_head, embed_scale=self.embed_scale(),
                           input_norm=self.build_input_norm(), logit_softcap=self.logit_softcap())

    def padding_idx(self) -> int | None:
        return getattr(self.config, "pad_token_id", None)

    def build_final_norm(self) -> nn.Module:
        return self._modeling_class("RMSNorm")(self.config.hidden_size, eps=self.config.rms_norm_eps)

    def build_input_norm(self) -> nn.Module | None:
        return None

    def embed_scale(self) -> float:
        return 1.0

    def logit_softcap(self) -> float | None:
        return None

    def client_keys(self) -> dict[str, str]:
        """Checkpoint tensor name -> name inside ClientParts (the LM head may be tied)."""
        prefixes = {"embed_tokens": self.embed_key.removesuffix(".weight"), "norm": self.norm_prefix,
                    "input_norm": self.input_norm_prefix, "lm_head": self.lm_head_key.removesuffix(".weight")}
        with torch.device("meta"):
            names = list(self.build_client_parts().state_dict())
        tied = getattr(self.config, "tie_word_embeddings", False)
        return {
            f"{prefixes[module]}.{leaf}": name
            for name in names for module, _, leaf in [name.partition(".")]
            if not (module == "lm_head" and tied)
        }

    # --- running a span ---------------------------------------------------------------------

    def layer_masks(
        self,
        span_config: PretrainedConfig,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None,
    ) -> list:
        """The attention mask each layer of the span gets, built by the library's own mask
        functions, exactly as the family's model forward builds them."""
        kwargs = dict(
            config=span_config, inputs_embeds=hidden_states, attention_mask=attention_mask,
            position_ids=position_ids, **cache_kwargs(cache),
        )
        layer_types = getattr(span_config, "layer_types", None)
        if layer_types is None:
            sliding = (getattr(span_config, "sliding_window", None) is not None
                       and span_config.model_type in self.sliding_window_model_types)
            mask = (create_sliding_window_causal_mask if sliding else create_causal_mask)(**kwargs)
            return [mask] * span_config.num_hidden_layers
        masks = {"full_attention": create_causal_mask}
        by_type = {}
        for kind in set(layer_types):
            if kind == "sliding_attention":
                by_type[kind] = create_sliding_window_causal_mask(**kwargs)
            elif kind in masks:
                by_type[kind] = masks[kind](**kwargs)
            else:
                raise NotImplementedError(f"layer type {kind!r} is not supported by {type(self).__name__}")
        return [by_type[kind] for kind in layer_types]

    def run_layers(
        self,
        layers: nn.ModuleList,
        rotary: nn.Module,
        span_config: PretrainedConfig,
        start: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None,
        before_block: BeforeBlock | None = None,
    ) -> torch.Tensor:
        arguments = self.layer_arguments(rotary, span_config, hidden_states, attention_mask, position_ids, cache)
        for i, layer in enumerate(layers):
            if before_block is not None:
                hidden_states = before_block(start + i, hidden_states)
            hidden_states = self.run_layer(layer, hidden_states, arguments[i])
        return hidden_states

    @staticmethod
    def run_layer(layer: nn.Module, hidden_states: torch.Tensor, arguments: dict) -> torch.Tensor:
        """One layer of `run_layers`, with its `layer_arguments` entry; a caller that runs the
        blocks one at a time (a training call, letting inference in between) calls this."""
        output = layer(hidden_states, **arguments)
        return output[0] if isinstance(output, tuple) else output  # older layouts return a tuple

    def layer_arguments(self, rotary: nn.Module, span_config: PretrainedConfig, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                        cache: Cache | None) -> list[dict]:
        """The keyword arguments each layer of the span gets besides the hidden states, as the
        family's model forward passes them; built once per forward (masks, rotary)."""
        masks = self.layer_masks(span_config, hidden_states, attention_mask, position_ids, cache)
        position_embeddings = self.layer_position_embeddings(rotary, span_config, hidden_states, position_ids)
        shared = dict(position_ids=position_ids, use_cache=cache is not None, **cache_kwargs(cache))
        return [dict(shared, attention_mask=masks[i], position_embeddings=position_embeddings[i])
                for i in range(span_config.num_hidden_layers)]

    def layer_position_embeddings(self, rotary: nn.Module, span_config: PretrainedConfig,
                                  hidden_states: torch.Tensor, position_ids: torch.Tensor) -> list:
        """The rotary (cos, sin) each layer gets: one pair for all, computed once per forward."""
        position_embeddings = rotary(hidden_states, position_ids=position_ids)
        return [position_embeddings] * span_config.num_hidden_layers


def alibi_positions_mask(attention_mask: torch.Tensor | None, hidden_states: torch.Tensor,
                         cache: Cache | None) -> torch.Tensor:
    """The mask ALiBi's positions are counted from: the caller's, or with no padding all ones
    over the cached and the new tokens."""
    if attention_mask is not None:
        return attention_mask
    batch, seq, _ = hidden_states.shape
    past = cache.get_seq_length() if cache is not None else 0
    return torch.ones(batch, past + seq, dtype=torch.long, device=hidden_states.device)
