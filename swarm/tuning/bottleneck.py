"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) inside remote blocks.

An adapter is a small residual MLP, ``h + up(f(down(h)))`` with ``down: hidden -> hidden /
reduction_factor``, applied to the output of a sub-module of the library's decoder layer by a
forward hook: after the feed-forward (``mlp``) only for Pfeiffer, after the attention
(``self_attn``) and the feed-forward for Houlsby, in both cases before the layer adds its
residual stream back. ``up`` starts at zero, so training starts from the base model.

PEFT has no such method, so adapters are saved in a format of our own (see `save_files`):

- ``bottleneck_adapters.json``: ``{"format": "swarmlm.bottleneck", "version": 1,
  "placement": "pfeiffer" | "houlsby", "locations": ["mlp"] or ["self_attn", "mlp"],
  "reduction_factor", "bottleneck_size", "hidden_size", "nonlinearity", "num_layers",
  "layers_prefix", "base_model_name_or_path"}``;
- ``bottleneck_adapters.safetensors``: per layer ``i`` and location ``loc``, tensors
  ``{layers_prefix}.{i}.{loc}.adapter_down.weight`` (bottleneck, hidden), ``...adapter_down.bias``
  (bottleneck,), ``...adapter_up.weight`` (hidden, bottleneck) and ``...adapter_up.bias`` (hidden,).

`attach_to_model(model, folder)` applies such a folder to a plain transformers model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .base import AdapterError, AdapterMethod, ExportTarget, integer_setting

PLACEMENTS = {"pfeiffer": ("mlp",), "houlsby": ("self_attn", "mlp")}
NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
CONFIG_FILE, WEIGHTS_FILE = "bottleneck_adapters.json", "bottleneck_adapters.safetensors"
FORMAT = "swarmlm.bottleneck"
PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


class BottleneckAdapter(AdapterMethod):
    name: ClassVar[str] = "bottleneck"

    def __init__(self, placement: str = "pfeiffer", reduction_factor: int = 16, nonlinearity: str = "relu"):
        if not isinstance(placement, str) or placement not in PLACEMENTS:
            raise AdapterError(f"bottleneck placement must be one of {sorted(PLACEMENTS)}, got {placement!r}")
        if not isinstance(nonlinearity, str) or nonlinearity not in NONLINEARITIES:
            raise AdapterError(f"bottleneck nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}")
        self.placement, self.nonlinearity = placement, nonlinearity
        self.reduction_factor = integer_setting(reduction_factor, "bottleneck", "reduction_factor", 1, 65536)

    @property
    def locations(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement]

    def settings(self) -> dict:
        return {"placement": self.placement, "reduction_factor": self.reduction_factor,
                "nonlinearity": self.nonlinearity}

    def bottleneck_size(self, hidden: int) -> int:
        return max(1, hidden // self.reduction_factor)

    def _modules(self, layer: nn.Module) -> tuple[int, dict[str, nn.Module]]:
        hidden = getattr(layer, "hidden_size", None)
        modules = {loc: getattr(layer, loc, None) for loc in self.locations}
        missing = [loc for loc, module in modules.items() if module is None]
        if hidden is None or missing:
            raise AdapterError(f"bottleneck adapters need a decoder layer with hidden_size and "
                               f"{', '.join(self.locations)}; {type(layer).__name__} lacks {missing or ['hidden_size']}")
        return hidden, modules

    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        hidden, _ = self._modules(layer)
        size = self.bottleneck_size(hidden)
        shapes = {}
        for loc in self.locations:
            shapes.update({f"{loc}.adapter_down.weight": (size, hidden), f"{loc}.adapter_down.bias": (size,),
                           f"{loc}.adapter_up.weight": (hidden, size), f"{loc}.adapter_up.bias": (hidden,)})
        return self._check_size(shapes, f"reduction factor {self.reduction_factor}")

    def attach(self, layer: nn.Module, tensors: dict[str, torch.Tensor], block_index: int) -> list:
        _, modules = self._modules(layer)
        activation = NONLINEARITIES[self.nonlinearity]
        return [module.register_forward_hook(_adapter_hook(*(tensors[f"{loc}.{p}"] for p in PARTS), activation))
                for loc, module in modules.items()]

    # --- the client's side ---------------------------------------------------------------------

    def init_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name.endswith("adapter_down.weight"):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # like nn.Linear
        else:
            nn.init.zeros_(tensor)  # up zero: the adapter starts as the identity

    def save_files(self, folder: Path, tensors: dict[str, torch.Tensor], target: ExportTarget) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        blocks = sorted({int(n.split(".", 1)[0]) for n in tensors})
        hidden = tensors[f"{blocks[0]}.{self.locations[0]}.adapter_up.bias"].shape[0]
        config = {"format": FORMAT, "version": 1, **self.settings(), "locations": list(self.locations),
                  "bottleneck_size": self.bottleneck_size(hidden), "hidden_size": hidden, "num_layers": len(blocks),
                  "layers_prefix": target.layers_prefix, "base_model_name_or_path": target.base_model}
        save_file({f"{target.layers_prefix}.{n}": t.detach().contiguous() for n, t in tensors.items()},
                  folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return True

    @classmethod
    def load_files(cls, folder: Path, target: ExportTarget):
        if not (folder / CONFIG_FILE).exists():
            return None
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT or config.get("version") != 1:
            raise AdapterError(f"{folder / CONFIG_FILE} is not a version-1 {FORMAT} file")
        method = cls(config["placement"], config["reduction_factor"], config["nonlinearity"])
        prefix = f"{config['layers_prefix']}."
        tensors = {k[len(prefix):]: t for k, t in load_file(folder / WEIGHTS_FILE).items() if k.startswith(prefix)}
        return method, tensors


def _adapter_hook(down_w, down_b, up_w, up_b, activation):
    def hook(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        delta = F.linear(activation(F.linear(hidden.to(down_w.dtype), down_w, down_b)), up_w, up_b)
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return hook


def attach_to_model(model: nn.Module, folder: str | Path) -> list:
    """Applies a saved folder's adapters to a plain transformers model (``model.model.layers``
    or wherever the folder says); returns the hook handles (``handle.remove()`` undoes it)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    found = BottleneckAdapter.load_files(folder, ExportTarget(config["layers_prefix"], ""))
    if found is None:
        raise AdapterError(f"{folder} holds no {CONFIG_FILE}")
    method, tensors = found
    layers = model.get_submodule(config["layers_prefix"])
    if len(layers) != config["num_layers"]:
        raise AdapterError(f"{folder} has adapters for {config['num_layers']} layers; the model has {len(layers)}")
    handles = []
    for i, layer in enumerate(layers):
        block = {n.split(".", 1)[1]: t for n, t in tensors.items() if n.split(".", 1)[0] == str(i)}
        method.check_tensors(layer, i, block)
        handles += method.attach(layer, block, i)
    return handles
