"""Mixtral: a Mistral-style decoder whose MLP is a sparse mixture of experts.

The library's layer routes each token to its top-k experts itself; what differs for us is
the checkpoint. transformers' layer holds every expert's matrices stacked in two tensors
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) while checkpoints on disk,
including what ``save_pretrained`` writes, keep one linear per expert under
``block_sparse_moe.experts.{e}.w1/w2/w3``. transformers converts on load (its
conversion_mapping for "mixtral"); a peer reads only its span, so it does the same
conversion here, for its own blocks.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import nn
from transformers import PretrainedConfig

from .base import ModelFamily, StoredTensor


def _stack_gate_up(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[w1_0, w3_0, w1_1, w3_1, ...] -> (experts, 2 * intermediate, hidden): gate rows, then up rows."""
    return torch.stack([torch.cat(tensors[i: i + 2]) for i in range(0, len(tensors), 2)])


class MixtralFamily(ModelFamily):
    model_types = ("mixtral",)
    class_prefixes = {"mixtral": "Mixtral"}
    sliding_window_model_types = ("mixtral",)

    def span_config(self, start: int, end: int) -> PretrainedConfig:
        span = super().span_config(start, end)
        if getattr(span, "_experts_implementation", None) is None:
            # What from_pretrained picks: all experts in one grouped matmul, not a loop over them.
            span._experts_implementation = "grouped_mm"
        return span

    def checkpoint_sources(self, layers: nn.ModuleList, start: int,
                           available: Container[str]) -> dict[str, StoredTensor]:
        sources = super().checkpoint_sources(layers, start, available)
        experts = range(self.config.num_local_experts)
        for i in range(len(layers)):
            block = f"{self.layers_prefix}.{start + i}"
            if f"{block}.mlp.experts.gate_up_proj" in available:
                continue  # already in the layer's own layout
            moe = f"{block}.block_sparse_moe"
            sources[f"{i}.mlp.gate.weight"] = StoredTensor((f"{moe}.gate.weight",))
            sources[f"{i}.mlp.experts.gate_up_proj"] = StoredTensor(
                tuple(f"{moe}.experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")), _stack_gate_up)
            sources[f"{i}.mlp.experts.down_proj"] = StoredTensor(
                tuple(f"{moe}.experts.{e}.w2.weight" for e in experts), torch.stack)
        return sources
