"""One mechanism for client-owned parameters that live inside remote blocks.

A tuning method (LoRA first; IA3, key/value prefixes and bottleneck adapters follow the
same shape) declares which tensors each block has, and how a peer applies them inside
the library's own decoder layer: with forward hooks on existing modules, never by
re-implementing the layer. The client owns the tensors and sends a span's worth with each
request; the peer applies them for that one call, returns their gradients, keeps nothing.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import nn


class AdapterError(ValueError):
    """Adapter tensors or settings do not fit the blocks they are sent to."""


class AdapterMethod(ABC):
    """A parameter-efficient tuning method whose tensors live on the client."""

    name: ClassVar[str]
    # Refuse configs whose tensors would exceed this many elements per block (a peer must
    # not let a request make it allocate without bound).
    max_elements_per_block: ClassVar[int] = 64 * 1024 * 1024

    @abstractmethod
    def settings(self) -> dict:
        """JSON-able settings that, with the tensors, fully define the method's effect."""

    @abstractmethod
    def tensor_shapes(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        """The tensors one block needs, by name, read off the (possibly meta) layer."""

    @abstractmethod
    def attach(self, layer: nn.Module, tensors: dict[str, torch.Tensor], block_index: int) -> list:
        """Makes the layer apply the tensors until the returned hook handles are removed."""

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


@contextlib.contextmanager
def adapters_applied(layers: nn.ModuleList, start: int, adapter_sets: list[AdapterSet]) -> Iterator[None]:
    """Applies the adapters to the span's layers for the duration of one call.

    Hooks are per call because one peer serves many clients, each with its own adapters;
    a peer runs one span computation at a time, so hooks of two calls never overlap.
    """
    handles = []
    try:
        for adapters in adapter_sets:
            stray = adapters.blocks() - set(range(start, start + len(layers)))
            if stray:
                raise AdapterError(
                    f"{adapters.method.name} tensors name blocks {sorted(stray)} outside the span "
                    f"[{start}, {start + len(layers)})"
                )
            for i, layer in enumerate(layers):
                tensors = adapters.for_block(start + i)
                adapters.method.check_tensors(layer, start + i, tensors)
                handles += adapters.method.attach(layer, tensors, start + i)
        yield
    finally:
        for handle in handles:
            handle.remove()
