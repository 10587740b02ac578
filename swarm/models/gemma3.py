"""Gemma 3 (text): alternating sliding-window and full attention, each kind with its own
rotary embedding, Gemma's RMSNorm (``x * (1 + w)``), embeddings scaled by sqrt(hidden) and
optionally soft-capped logits.

The masks per layer kind come from the base recipe (the config's ``layer_types``); what
Gemma adds is one (cos, sin) pair per kind, as ``Gemma3TextModel.forward`` computes them,
and the client-side scale and norm.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .base import ModelFamily


class Gemma3Family(ModelFamily):
    model_types = ("gemma3_text",)
    class_prefixes = {"gemma3_text": "Gemma3"}
    modeling_modules = {"gemma3_text": "gemma3"}

    def __init__(self, config: PretrainedConfig):
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                "this Gemma 3 config has use_bidirectional_attention=True (an encoder such as EmbeddingGemma); "
                "only causal language models can be served"
            )
        super().__init__(config)

    def layer_position_embeddings(self, rotary: nn.Module, span_config: PretrainedConfig,
                                  hidden_states: torch.Tensor, position_ids: torch.Tensor) -> list:
        by_kind = {kind: rotary(hidden_states, position_ids, kind) for kind in set(span_config.layer_types)}
        return [by_kind[kind] for kind in span_config.layer_types]

    def embed_scale(self) -> float:
        return self.config.hidden_size ** 0.5

    def logit_softcap(self) -> float | None:
        return self.config.final_logit_softcapping
