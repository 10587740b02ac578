"""BLOOM: ALiBi instead of positions, fused query/key/value, LayerNorms with biases, and a
LayerNorm on the word embeddings (``word_embeddings_layernorm``) that the client applies
before the first block. Blocks are ``transformer.h.N``.

BLOOM's blocks take ``layer_past`` and ``alibi``, return a tuple and compute attention
themselves (no SDPA: transformers runs them "eager", with an additive float mask);
``run_layers`` mirrors ``BloomModel.forward``: ALiBi from the padding mask when there is
one, else from the key length alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from swarm.compat import cache_kwargs

from .base import ModelFamily, alibi_positions_mask


class BloomFamily(ModelFamily):
    model_types = ("bloom",)
    class_prefixes = {"bloom": "Bloom"}
    attn_implementation = "eager"
    default_lora_targets = ("self_attention.query_key_value",)

    layers_prefix = "transformer.h"
    embed_key = "transformer.word_embeddings.weight"
    norm_prefix = "transformer.ln_f"
    input_norm_prefix = "transformer.word_embeddings_layernorm"

    def build_layers(self, span_config: PretrainedConfig) -> nn.ModuleList:
        block = self._modeling_class("Block")
        return nn.ModuleList(block(span_config, layer_idx=i) for i in range(span_config.num_hidden_layers))

    def build_rotary(self, span_config: PretrainedConfig) -> nn.Module:
        return nn.Module()  # ALiBi needs no module: it is computed from the mask

    def padding_idx(self) -> int | None:
        return None  # BloomModel's word embeddings have no padding row

    def build_final_norm(self) -> nn.Module:
        return nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_epsilon)

    def build_input_norm(self) -> nn.Module:
        return nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_epsilon)

    def layer_arguments(self, rotary: nn.Module, span_config: PretrainedConfig, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                        cache: Cache | None) -> list[dict]:
        mask = alibi_positions_mask(attention_mask, hidden_states, cache)
        alibi = build_alibi_tensor(mask, span_config.n_head, dtype=hidden_states.dtype)
        causal_mask = create_causal_mask(
            config=span_config, inputs_embeds=hidden_states, attention_mask=attention_mask, **cache_kwargs(cache),
        )
        arguments = dict(layer_past=cache, attention_mask=causal_mask, use_cache=cache is not None, alibi=alibi)
        return [arguments] * span_config.num_hidden_layers
