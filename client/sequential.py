"""The remote blocks as a torch module: `model.model.layers`, like Petals' RemoteSequential.

Call it on hidden states (forward and backward go through the peers), slice it
(`layers[10:20]`), or drop it into your own torch code.
"""

from __future__ import annotations

import torch
from torch import nn

from .autograd import remote_forward
from .remote_swarm import RemoteSwarm


class RemoteSequential(nn.Module):
    """Blocks [start, end) of the swarm's model."""

    def __init__(self, swarm: RemoteSwarm, start: int = 0, end: int | None = None):
        super().__init__()
        end = swarm.num_blocks if end is None else end
        if not 0 <= start < end <= swarm.num_blocks:
            raise IndexError(f"blocks [{start}, {end}) are not inside [0, {swarm.num_blocks})")
        self.swarm, self.start, self.end = swarm, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> "RemoteSequential":
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"block {index} is out of range for {len(self)} blocks")
            first = self.start + index % len(self)
            return RemoteSequential(self.swarm, first, first + 1)
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("remote blocks can only be sliced contiguously (step 1)")
        return RemoteSequential(self.swarm, self.start + start, self.start + stop)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return remote_forward(self.swarm, hidden_states, attention_mask, position_ids, start=self.start, end=self.end)

    def extra_repr(self) -> str:
        return f"blocks [{self.start}, {self.end}) of {self.swarm.model_id}"


class RemoteBody(nn.Module):
    """Stands where transformers keeps the decoder (`model.model`), so code that reaches for
    `model.model.layers` finds the remote blocks."""

    def __init__(self, swarm: RemoteSwarm):
        super().__init__()
        self.layers = RemoteSequential(swarm)
