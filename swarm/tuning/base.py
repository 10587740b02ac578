"""One mechanism for client-owned parameters that live inside remote blocks.

A tuning method (LoRA, IA3, key/value prefixes, bottleneck adapters) is a small declarative
thing:

- `tensor_shapes`: which tensors each block has, read off the library's own layer;
- `attach`: how a peer applies them inside that layer, with forward hooks on its existing
  modules (never by re-implementing the layer), and/or `kv_prefix`: keys/values the peer
  puts in the layer's KV cache ahead of the input;
- `max_elements_per_block` and the checks in `__init__`: the size limits a peer enforces.

The client owns the tensors and sends a span's worth with each request; the peer applies them
for that one call (or one inference session), returns their gradients and keeps nothing.
Client-side concerns live on the method too, so adding a method is one module: how its
tensors start (`init_tensor`), an optional reparametrisation that computes them from other
parameters (`client_encoder`), and the files it is exported to (`save_files` / `load_files`).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn


class AdapterError(ValueError):
    """Adapter tensors or settings do not fit the blocks they are sent to."""


@dataclass
class ExportTarget:
    """What a method's exported files must say about the model they belong to."""

    layers_prefix: str  # where the decoder layers sit in the transformers model, e.g. "model.layers"
    base_model: str  # name or path of the base model, recorded in the files


class AdapterMethod(ABC):
    """A parameter-efficient tuning method whose tensors live on the client."""

    name: ClassVar[str]
    peft_type: ClassVar[str | None] = None  # the method's name in PEFT, where PEFT has it
    # Refuse configs whose tensors would exceed this many elements per block (a peer must
    # not let a request make it allocate without bound).
    max_elements_per_block: ClassVar[int] = 64 * 1024 * 1024
    # Per training step, for methods with dropout: the client sets it so that a peer
    # recomputing the forward pass for Backward draws the masks the Forward call drew.
    seed: int | None = None

    # --- what travels and how a peer applies it -------------------------------------------------

    @abstractmethod
    def settings(self) -> dict:
        """JSON-able settings that, with the tensors, fully define the method's effect."""

    @abstractmethod
    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        """The tensors one block needs, by name, read off the (possibly meta) layer."""

    # Whether `attach` hooks the layers' modules. A session whose methods do not (a prefix lives
    # in its cache only) can share one forward pass with other sessions' decode steps.
    hooks_layers: ClassVar[bool] = True

    def attach(self, layer: nn.Module, tensors: dict[str, torch.Tensor], block_index: int) -> list:
        """Makes the layer apply the tensors until the returned hook handles are removed."""
        return []

    @property
    def prefix_length(self) -> int:
        """Key/value positions this method puts in every layer's cache ahead of the input."""
        return 0

    def kv_prefix(self, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (kv_heads, prefix_length, head_dim), for methods with a prefix."""
        raise NotImplementedError(f"{self.name} puts nothing in the KV cache")

    def to_json(self) -> str:
        return json.dumps(self.settings(), sort_keys=True)

    def check_tensors(self, layer: nn.Module, block_index: int, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.tensor_shapes(layer)
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise AdapterError(f"{self.name} tensors for block {block_index}: missing {missing}, unexpected {extra}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise AdapterError(
                    f"{self.name} tensor {block_index}.{name} has shape {tuple(tensors[name].shape)}, expected {shape}"
                )
            if not tensors[name].is_floating_point():
                raise AdapterError(f"{self.name} tensor {block_index}.{name} must be floating point")

    def _check_size(self, shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, tuple[int, ...]]:
        if sum(torch.Size(s).numel() for s in shapes.values()) > self.max_elements_per_block:
            raise AdapterError(f"{self.name}: {what} is too large for these layers (over "
                               f"{self.max_elements_per_block} elements per block)")
        return shapes

    # --- the client's side ---------------------------------------------------------------------

    def init_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Initialises one client parameter in place ("{block}.{tensor_name}"); default zero."""
        nn.init.zeros_(tensor)

    def client_encoder(self, shapes: dict[str, tuple[int, ...]]) -> nn.Module | None:
        """A module whose `forward()` computes every block's tensors (global names -> tensor)
        from its own parameters, when the method trains through a reparametrisation; None when
        the tensors themselves are the parameters."""
        return None

    @classmethod
    def from_peft_config(cls, config: dict) -> "AdapterMethod":
        """The method a PEFT config (``PeftConfig.to_dict()`` or adapter_config.json) describes."""
        raise AdapterError(f"{cls.name} has no PEFT config")

    def save_files(self, folder: Path, tensors: dict[str, torch.Tensor], target: ExportTarget) -> bool:
        """Writes the method in a format other tools read (e.g. PEFT's); False if it has none."""
        return False

    @classmethod
    def load_files(cls, folder: Path, target: ExportTarget) -> tuple["AdapterMethod", dict[str, torch.Tensor]] | None:
        """The method and tensors of a folder `save_files` (or the other tool) wrote; None if
        the folder holds no such files."""
        return None


def integer_setting(value, method: str, name: str, low: int, high: int) -> int:
    """An integer setting (which may come off the wire as any JSON value) checked against [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise AdapterError(f"{method} {name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def module_targets(targets, method: str) -> tuple[str, ...]:
    """Target module names as given in settings (which may come off the wire): non-empty strings."""
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(f"{method} targets must be a list of module names, e.g. ['q_proj', 'v_proj'], got {targets!r}")
    return tuple(targets)


def find_linears(layer: nn.Module, targets: tuple[str, ...], method: str) -> dict[str, nn.Linear]:
    """The layer's linears named by `targets`: full paths inside the layer ("self_attn.q_proj")
    or their last component ("q_proj"); every target must name at least one linear."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, nn.Linear] = {}
    for target in targets:
        hits = {n: m for n, m in linears.items() if n == target or n.endswith("." + target)}
        if not hits:
            raise AdapterError(f"{method} target {target!r} matches no linear layer; this layer has {sorted(linears)}")
        found.update(hits)
    return dict(sorted(found.items()))


@dataclass
class AdapterSet:
    """One method's tensors for a span; names are "{global_block_index}.{tensor_name}"."""

    method: AdapterMethod
    tensors: dict[str, torch.Tensor]

    def for_block(self, block_index: int) -> dict[str, torch.Tensor]:
        prefix = f"{block_index}."
        return {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}

    def blocks(self) -> set[int]:
        return {int(name.split(".", 1)[0]) for name in self.tensors}


@dataclass
class AppliedAdapters:
    """What a span must do beyond the hooks: keys/values to put ahead of the input, per layer."""

    prefix_length: int = 0
    kv_prefixes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def check_adapters(layers: nn.ModuleList, start: int, adapter_sets: list[AdapterSet]) -> None:
    """Raises AdapterError unless every set's tensors fit the span's blocks [start, start +
    len(layers)), with at most one set putting keys/values in the cache; attaches nothing."""
    with_prefix = [a for a in adapter_sets if a.method.prefix_length]
    if len(with_prefix) > 1:
        raise AdapterError(f"at most one method may put keys/values in the cache; got "
                           f"{', '.join(a.method.name for a in with_prefix)}")
    for adapters in adapter_sets:
        stray = adapters.blocks() - set(range(start, start + len(layers)))
        if stray:
            raise AdapterError(
                f"{adapters.method.name} tensors name blocks {sorted(stray)} outside the span "
                f"[{start}, {start + len(layers)})"
            )
        for i, layer in enumerate(layers):
            adapters.method.check_tensors(layer, start + i, adapters.for_block(start + i))


@contextlib.contextmanager
def adapters_applied(layers: nn.ModuleList, start: int, adapter_sets: list[AdapterSet],
                     checked: bool = False) -> Iterator[AppliedAdapters]:
    """Applies the adapters to the span's layers for the duration of one call.

    Hooks are per call because one peer serves many clients, each with its own adapters;
    a peer runs one span computation at a time, so hooks of two calls never overlap (a
    training call that lets inference run between its blocks applies them one block at a
    time: `layers[i:i + 1]` from `start + i`, none attached in between).
    `checked`: the sets were already checked against these layers (`check_adapters`: an
    inference session's at its open, a training call's once for all its blocks), so a decode
    step does not re-validate every tensor against every block.
    """
    if not checked:
        check_adapters(layers, start, adapter_sets)
    handles = []
    applied = AppliedAdapters()
    try:
        for adapters in adapter_sets:
            for i, layer in enumerate(layers):
                tensors = adapters.for_block(start + i)
                handles += adapters.method.attach(layer, tensors, start + i)
                if adapters.method.prefix_length:
                    applied.kv_prefixes.append(adapters.method.kv_prefix(layer, tensors))
            if adapters.method.prefix_length:
                applied.prefix_length = adapters.method.prefix_length
        yield applied
    finally:
        for handle in handles:
            handle.remove()
