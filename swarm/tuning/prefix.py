"""Prefix tuning (Li & Liang, 2021): trainable keys and values that every attention layer
sees ahead of the input, as if a prefix of virtual tokens had been run before it.

Distinct from deep prompts (which add to hidden states): the prefix lives in the layer's KV
cache. A peer fills a cache with the span's prefixes for each Forward/Backward call (kept
autograd-connected to the sent tensors, so their gradients flow back) and, for an inference
session, when it opens, ahead of the prompt. Like PEFT, the input's positions then start
after the prefix and its attention mask is extended with ones for it.

The client may train the prefix through PEFT's reparametrisation: a two-layer MLP from a
smaller embedding (`projection`); the peers still receive plain keys/values and never see it.
Keys/values are stored as PEFT's ``prompt_embeddings``, so ``PeftModel.from_pretrained``
loads a prefix trained here with the same outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterError, AdapterMethod, ExportTarget, integer_setting
from .peft_files import read_peft, write_peft

MAX_VIRTUAL_TOKENS = 512  # the prefix takes cache memory on every peer, for every request
KEYS, VALUES = "prefix_keys", "prefix_values"


class PrefixTuning(AdapterMethod):
    name: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    hooks_layers: ClassVar[bool] = False  # keys/values in the cache only

    def __init__(self, num_virtual_tokens: int = 16, projection: int | None = None):
        self.num_virtual_tokens = integer_setting(num_virtual_tokens, "prefix", "num_virtual_tokens", 1,
                                                  MAX_VIRTUAL_TOKENS)
        # The MLP's hidden size; it lives on the client only, peers just carry the number.
        self.projection = None if projection is None else integer_setting(projection, "prefix", "projection", 1, 65536)

    def settings(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection": self.projection}

    @property
    def prefix_length(self) -> int:
        return self.num_virtual_tokens

    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        attention = getattr(layer, "self_attn", None)
        head_dim = getattr(attention, "head_dim", None)
        kv_heads = getattr(getattr(attention, "config", None), "num_key_value_heads", None)
        if head_dim is None or kv_heads is None:
            raise AdapterError(f"prefix tuning needs a decoder layer whose self_attn has head_dim and a config "
                               f"with num_key_value_heads; {type(layer).__name__} has not")
        shape = (kv_heads, self.num_virtual_tokens, head_dim)
        return self._check_size({KEYS: shape, VALUES: shape}, f"{self.num_virtual_tokens} virtual tokens")

    def kv_prefix(self, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[KEYS], tensors[VALUES]

    # --- the client's side ---------------------------------------------------------------------

    def init_tensor(self, name: str, tensor: torch.Tensor) -> None:
        # Small: a large random prefix would drown the model's own attention at the start.
        nn.init.normal_(tensor, std=0.02)

    def client_encoder(self, shapes: dict[str, tuple[int, ...]]) -> nn.Module | None:
        if self.projection is None:
            return None
        return PrefixEncoder(shapes, self.projection)

    def save_files(self, folder: Path, tensors: dict[str, torch.Tensor], target: ExportTarget) -> bool:
        blocks = _blocks(tensors)
        kv_heads, _, head_dim = tensors[f"{blocks[0]}.{KEYS}"].shape
        config = {
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": target.base_model,
            "num_virtual_tokens": self.num_virtual_tokens, "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads, "num_layers": len(blocks), "num_transformer_submodules": 1,
            "encoder_hidden_size": self.projection or kv_heads * head_dim,
            "prefix_projection": self.projection is not None, "init_weights": None, "inference_mode": True,
            "modules_to_save": None,
        }
        write_peft(folder, config, {"prompt_embeddings": flatten_prefix(tensors)})
        return True

    @classmethod
    def load_files(cls, folder: Path, target: ExportTarget):
        found = read_peft(folder, "PREFIX_TUNING")
        if found is None:
            return None
        config, weights = found
        if config.get("num_transformer_submodules", 1) != 1:
            raise AdapterError(f"{folder}: prefix tuning for encoder-decoder models is not supported")
        kv_heads = config["num_attention_heads"]
        head_dim = config["token_dim"] // kv_heads
        # PEFT keeps only the computed keys/values, not the MLP that made them: they load as plain tensors.
        tensors = unflatten_prefix(weights["prompt_embeddings"], config["num_layers"], kv_heads, head_dim)
        return cls(num_virtual_tokens=config["num_virtual_tokens"]), tensors

    @classmethod
    def from_peft_config(cls, config: dict) -> "PrefixTuning":
        projection = None
        if config.get("prefix_projection"):
            projection = config.get("encoder_hidden_size")
            if projection is None:
                raise AdapterError("a prefix_projection config needs encoder_hidden_size (the MLP's hidden size)")
        return cls(num_virtual_tokens=config["num_virtual_tokens"], projection=projection)


def _blocks(tensors: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(name.split(".", 1)[0]) for name in tensors})


def flatten_prefix(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-block (kv_heads, P, head_dim) keys/values -> PEFT's (P, layers * 2 * kv_heads * head_dim),
    laid out as PEFT's get_prompt reads it: layer-major, then key/value, then head, then dim."""
    per_block = [torch.stack([tensors[f"{b}.{KEYS}"], tensors[f"{b}.{VALUES}"]]) for b in _blocks(tensors)]
    stacked = torch.stack(per_block)  # (layers, 2, kv_heads, P, head_dim)
    return stacked.permute(3, 0, 1, 2, 4).reshape(stacked.shape[3], -1)


def unflatten_prefix(flat: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_prefix`."""
    expected = num_layers * 2 * kv_heads * head_dim
    if flat.ndim != 2 or flat.shape[1] != expected:
        raise AdapterError(f"prefix embeddings must have shape (virtual tokens, {expected}), got {tuple(flat.shape)}")
    stacked = flat.reshape(flat.shape[0], num_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    tensors = {}
    for block in range(num_layers):
        tensors[f"{block}.{KEYS}"], tensors[f"{block}.{VALUES}"] = stacked[block, 0], stacked[block, 1]
    return tensors


class PrefixEncoder(nn.Module):
    """PEFT's reparametrisation, on the client: virtual-token embeddings -> Linear -> tanh ->
    Linear to every layer's keys and values. Same parameter names and layout as PEFT's."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], hidden: int):
        super().__init__()
        self.num_layers = len(_blocks(shapes))
        self.kv_heads, num_virtual_tokens, self.head_dim = shapes[f"{min(_blocks(shapes))}.{KEYS}"]
        token_dim = self.kv_heads * self.head_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, self.num_layers * 2 * token_dim))

    def forward(self) -> dict[str, torch.Tensor]:
        flat = self.transform(self.embedding.weight)
        return unflatten_prefix(flat, self.num_layers, self.kv_heads, self.head_dim)
