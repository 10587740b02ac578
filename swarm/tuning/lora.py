"""LoRA (Hu et al., 2021) on the linear layers of remote blocks.

Each targeted linear ``W`` gains ``B @ A`` scaled by ``alpha / rank``: ``y = W x + s * B A drop(x)``.
The same arithmetic as PEFT's ``lora.Linear``, so a LoRA trained here loads into PEFT and
gives the same outputs. Dropout masks come from a seeded generator, so a peer recomputing
the forward pass for Backward draws exactly the masks the Forward call drew.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterError, AdapterMethod

DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


class LoRA(AdapterMethod):
    name: ClassVar[str] = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
        dropout: float = 0.0,
        seed: int | None = None,
    ):
        if not 1 <= int(rank) <= 1024:
            raise AdapterError(f"LoRA rank must be in [1, 1024], got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not targets:
            raise AdapterError("LoRA needs at least one target module, e.g. ['q_proj', 'v_proj']")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = tuple(targets)
        self.seed = seed  # None: dropout is off (inference); set per training step by the client

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "dropout": self.dropout, "seed": self.seed}

    def resolve_targets(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Target names may be full paths inside the layer ("self_attn.q_proj") or the last
        component ("q_proj"); every target must name at least one linear."""
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        found: dict[str, nn.Linear] = {}
        for target in self.targets:
            hits = {n: m for n, m in linears.items() if n == target or n.endswith("." + target)}
            if not hits:
                raise AdapterError(
                    f"LoRA target {target!r} matches no linear layer; this layer has {sorted(linears)}"
                )
            found.update(hits)
        return dict(sorted(found.items()))

    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, linear in self.resolve_targets(layer).items():
            shapes[f"{name}.lora_A"] = (self.rank, linear.in_features)
            shapes[f"{name}.lora_B"] = (linear.out_features, self.rank)
        if sum(torch.Size(s).numel() for s in shapes.values()) > self.max_elements_per_block:
            raise AdapterError(f"LoRA rank {self.rank} is too large for these layers")
        return shapes

    def attach(self, layer: nn.Module, tensors: dict[str, torch.Tensor], block_index: int) -> list:
        handles = []
        for name, linear in self.resolve_targets(layer).items():
            lora_a, lora_b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            generator = None
            if self.dropout > 0 and self.seed is not None:
                generator = torch.Generator(device=lora_a.device)
                generator.manual_seed(self.seed * 1_000_003 + block_index * 7919 + zlib.crc32(name.encode()))
            handles.append(linear.register_forward_hook(self._hook(lora_a, lora_b, generator)))
        return handles

    def _hook(self, lora_a: torch.Tensor, lora_b: torch.Tensor, generator: torch.Generator | None):
        scaling, p = self.scaling, self.dropout

        def add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if generator is not None:
                keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
                x = x * keep / (1.0 - p)
            delta = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
            return output + delta.to(output.dtype)

        return add_lora
