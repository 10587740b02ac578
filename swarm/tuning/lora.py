"""LoRA (Hu et al., 2021) on the linear layers of remote blocks.

Each targeted linear ``W`` gains ``B @ A`` scaled by ``alpha / rank``: ``y = W x + s * B A drop(x)``.
The same arithmetic as PEFT's ``lora.Linear``, so a LoRA trained here loads into PEFT and
gives the same outputs. Dropout masks come from a seeded generator, so a peer recomputing
the forward pass for Backward draws exactly the masks the Forward call drew.
"""

from __future__ import annotations

import math
import numbers
import zlib
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterError, AdapterMethod, ExportTarget, find_linears, module_targets
from .peft_files import block_key, module_names, read_block_tensors, write_peft

DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


class LoRA(AdapterMethod):
    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
        dropout: float = 0.0,
        seed: int | None = None,
    ):
        # Settings come as JSON from any client: check their types before converting anything.
        for key, value in (("rank", rank), ("alpha", alpha), ("dropout", dropout)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise AdapterError(f"LoRA {key} must be a finite number, got {value!r}")
        if isinstance(targets, str):
            targets = (targets,)
        if targets is not None and not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"LoRA targets must be module names, e.g. ['q_proj', 'v_proj'], got {targets!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < 2**32):
            raise AdapterError(f"LoRA seed must be None or an integer in [0, 2**32), got {seed!r}")
        if not 1 <= int(rank) <= 1024:
            raise AdapterError(f"LoRA rank must be in [1, 1024], got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not targets:
            raise AdapterError("LoRA needs at least one target module, e.g. ['q_proj', 'v_proj']")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = module_targets(targets, "LoRA")
        self.seed = None if seed is None else int(seed)  # None: dropout off (inference); set per training step

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "dropout": self.dropout, "seed": self.seed}

    def resolve_targets(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return find_linears(layer, self.targets, "LoRA")

    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, linear in self.resolve_targets(layer).items():
            shapes[f"{name}.lora_A"] = (self.rank, linear.in_features)
            shapes[f"{name}.lora_B"] = (linear.out_features, self.rank)
        return self._check_size(shapes, f"rank {self.rank}")

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

    # --- the client's side ---------------------------------------------------------------------

    def init_tensor(self, name: str, tensor: torch.Tensor) -> None:
        # PEFT's init: A like a linear layer, B zero, so training starts from the base model.
        if name.endswith("lora_A"):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        else:
            nn.init.zeros_(tensor)

    def save_files(self, folder: Path, tensors: dict[str, torch.Tensor], target: ExportTarget) -> bool:
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": target.base_model,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in self.targets}), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
            "modules_to_save": None,
        }
        write_peft(folder, config, {block_key(target, n, ".weight"): t for n, t in tensors.items()})
        return True

    @classmethod
    def load_files(cls, folder: Path, target: ExportTarget):
        return read_block_tensors(folder, target, "LORA", cls.from_peft_config, ".weight")

    @classmethod
    def from_peft_config(cls, config: dict) -> "LoRA":
        if config.get("use_rslora") or config.get("use_dora") or config.get("bias", "none") != "none":
            raise AdapterError("LoRA variants (rslora, DoRA, trained biases) are not supported")
        targets = config.get("target_modules")
        return cls(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                   targets=module_names(targets) if targets else DEFAULT_TARGETS)
