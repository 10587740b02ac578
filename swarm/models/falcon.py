"""Falcon: fused query/key/value, parallel attention and MLP, LayerNorms with biases, and
either rotary positions or ALiBi biases (``config.alibi``). Covers both decoder layouts the
library's ``FalconDecoderLayer`` implements: the original one (one LayerNorm, multi-query)
and the "new decoder architecture" of Falcon-40B/180B (two LayerNorms, grouped KV heads).

Falcon's layers take ``layer_past`` and ``alibi`` instead of the Llama arguments and
return a tuple, and its forward folds ALiBi into the attention mask; ``run_layers``
mirrors ``FalconModel.forward`` step by step.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from swarm.compat import cache_kwargs

from .base import ModelFamily, alibi_positions_mask


class FalconFamily(ModelFamily):
    model_types = ("falcon",)
    class_prefixes = {"falcon": "Falcon"}
    default_lora_targets = ("self_attention.query_key_value",)

    layers_prefix = "transformer.h"
    embed_key = "transformer.word_embeddings.weight"
    norm_prefix = "transformer.ln_f"

    def padding_idx(self) -> int | None:
        return None  # FalconModel's word embeddings have no padding row

    def build_final_norm(self) -> nn.Module:
        return nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_epsilon)

    def layer_arguments(self, rotary: nn.Module, span_config: PretrainedConfig, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                        cache: Cache | None) -> list[dict]:
        batch = hidden_states.shape[0]
        num_heads = span_config.num_attention_heads
        alibi = None
        if span_config.alibi:
            mask = alibi_positions_mask(attention_mask, hidden_states, cache)
            alibi = build_alibi_tensor(mask, num_heads, dtype=hidden_states.dtype)
        causal_mask = create_causal_mask(
            config=span_config, inputs_embeds=hidden_states, attention_mask=attention_mask,
            **cache_kwargs(cache), allow_is_causal_skip=False,  # materialised, so ALiBi can be added
        )
        if alibi is not None and causal_mask is not None and causal_mask.ndim == 4:
            min_dtype = torch.finfo(hidden_states.dtype).min
            if causal_mask.dtype == torch.bool:
                causal_mask = torch.where(
                    causal_mask, torch.full((), 0.0, device=causal_mask.device, dtype=hidden_states.dtype), min_dtype
                )
            alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
            causal_mask = torch.masked_fill(
                alibi / math.sqrt(span_config.hidden_size // num_heads), causal_mask < -1, min_dtype
            )
        arguments = dict(layer_past=cache, attention_mask=causal_mask, position_ids=position_ids,
                         use_cache=cache is not None, alibi=alibi,
                         position_embeddings=rotary(hidden_states, position_ids=position_ids))
        return [arguments] * span_config.num_hidden_layers
