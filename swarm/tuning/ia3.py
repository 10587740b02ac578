"""IA3 (Liu et al., 2022): learned vectors that rescale activations inside remote blocks.

Attention targets (keys and values by default) have their OUTPUT scaled, ``y = l * (W x)``;
feed-forward targets (``down_proj`` by default) have their INPUT scaled, ``y = W (l * x)``,
which rescales the feed-forward's intermediate activations. The same arithmetic, tensor
shapes and names as PEFT's ``ia3.Linear`` (``(out, 1)`` and ``(1, in)`` vectors), so an IA3
trained here loads into PEFT and gives the same outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterError, AdapterMethod, ExportTarget, find_linears, module_targets
from .peft_files import block_key, module_names, read_block_tensors, write_peft

DEFAULT_TARGETS = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
DEFAULT_FEEDFORWARD = ("mlp.down_proj",)


class IA3(AdapterMethod):
    name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"

    def __init__(self, targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
                 feedforward: tuple[str, ...] | list[str] = DEFAULT_FEEDFORWARD):
        if not targets:
            raise AdapterError("IA3 needs at least one target module, e.g. ['k_proj', 'v_proj', 'down_proj']")
        self.targets = module_targets(targets, "IA3")
        self.feedforward = module_targets(feedforward, "IA3 feedforward") if feedforward else ()
        unknown = [f for f in self.feedforward if not any(_same(f, t) for t in self.targets)]
        if unknown:
            raise AdapterError(f"IA3 feedforward modules {unknown} must also be targets ({list(self.targets)})")

    def settings(self) -> dict:
        return {"targets": list(self.targets), "feedforward": list(self.feedforward)}

    def _resolve(self, layer: nn.Module) -> dict[str, tuple[nn.Linear, bool]]:
        """Target linears by name, each with whether it is a feed-forward (input-scaled) one."""
        feedforward = set(find_linears(layer, self.feedforward, "IA3 feedforward")) if self.feedforward else set()
        return {name: (linear, name in feedforward) for name, linear in find_linears(layer, self.targets, "IA3").items()}

    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        return self._check_size({
            f"{name}.ia3_l": (1, linear.in_features) if is_ff else (linear.out_features, 1)
            for name, (linear, is_ff) in self._resolve(layer).items()
        }, "IA3")

    def attach(self, layer: nn.Module, tensors: dict[str, torch.Tensor], block_index: int) -> list:
        handles = []
        for name, (linear, is_ff) in self._resolve(layer).items():
            scale = tensors[f"{name}.ia3_l"].flatten()
            if is_ff:
                handles.append(linear.register_forward_pre_hook(_scale_input(scale)))
            else:
                handles.append(linear.register_forward_hook(_scale_output(scale)))
        return handles

    # --- the client's side ---------------------------------------------------------------------

    def init_tensor(self, name: str, tensor: torch.Tensor) -> None:
        nn.init.ones_(tensor)  # PEFT's init: training starts from the base model

    def save_files(self, folder: Path, tensors: dict[str, torch.Tensor], target: ExportTarget) -> bool:
        config = {
            "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": target.base_model,
            "target_modules": _last_names(self.targets), "feedforward_modules": _last_names(self.feedforward),
            "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
        }
        write_peft(folder, config, {block_key(target, n): t for n, t in tensors.items()})
        return True

    @classmethod
    def load_files(cls, folder: Path, target: ExportTarget):
        return read_block_tensors(folder, target, "IA3", cls.from_peft_config)

    @classmethod
    def from_peft_config(cls, config: dict) -> "IA3":
        targets = config.get("target_modules")
        if not targets:  # PEFT's defaults for Llama-like models
            return cls()
        return cls(targets=module_names(targets), feedforward=module_names(config.get("feedforward_modules")))


def _same(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _last_names(names: tuple[str, ...]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def _scale_output(scale: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return (output * scale).to(output.dtype)

    return hook


def _scale_input(scale: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return ((x.to(scale.dtype) * scale).to(x.dtype),) + tuple(args[1:])

    return hook
