"""A span's forward pass kept with its autograd graph (`SpanGraph`, one segment per block,
backward block by block), the gradients a backward pass through it returns (`SpanGrads`), and
the count of the memory such a graph holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .span_inputs import SpanInputError, SpanInputs


@dataclass
class SpanGrads:
    """Gradients a Backward call returns: w.r.t. the span's input hidden states, its deep
    prompts (when sent) and each adapter set's tensors (same names as sent)."""

    hidden_states: torch.Tensor
    deep_prompts: torch.Tensor | None = None
    adapters: list[dict[str, torch.Tensor]] = field(default_factory=list)


class SpanGraph:
    """A span's forward pass with its autograd graph, waiting for the gradient of its output.

    The graph is kept in segments, one per block, from the block's input (a leaf of its own)
    to its output, so Backward runs block by block in reverse, letting inference run between
    blocks (`between_blocks`) with no autograd work of this call in progress. Client tensors
    are leaves shared by the segments (deep prompts feed every block, an adapter's tensors
    theirs); their gradients are summed over the segments."""

    def __init__(self, segments: list[tuple[torch.Tensor, torch.Tensor]], leaves: SpanInputs, nbytes: int) -> None:
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] | None = segments  # (input leaf, output) per block
        self.inputs, self.prompts = leaves.hidden_states, leaves.deep_prompts
        self.adapters = [a.tensors for a in leaves.adapters]
        self.nbytes = nbytes  # what autograd saved for backward: the memory this graph holds

    def matches(self, inputs: SpanInputs) -> bool:
        """Whether these are exactly the inputs, deep prompts and tuning tensors this graph was built
        from. A peer checks before answering a Backward from a kept graph (a memcmp of what was sent,
        ~0.1 ms for 4 x 64 tokens): a client that reuses an id with other inputs gets a
        recomputation, never a wrong gradient."""
        if (not _same_tensor(self.inputs, inputs.hidden_states)
                or not _same_tensor(self.prompts, inputs.deep_prompts)):
            return False
        if len(self.adapters) != len(inputs.adapters):
            return False
        return all(kept.keys() == sent.tensors.keys() and all(_same_tensor(kept[k], sent.tensors[k]) for k in kept)
                   for kept, sent in zip(self.adapters, inputs.adapters))

    def backward(self, grad_outputs: torch.Tensor, between_blocks: Callable[[], object] | None = None) -> SpanGrads:
        """Gradients of ``(outputs * grad_outputs).sum()``; frees the graph (one use only), each
        block's part as soon as it is done. `between_blocks`, if given, is called between two
        blocks."""
        if self.segments is None:
            raise RuntimeError("this forward's graph was already used by a Backward")
        outputs = self.segments[-1][1]
        if grad_outputs.shape != outputs.shape:
            raise SpanInputError(f"grad_outputs shape {tuple(grad_outputs.shape)} must equal the forward's "
                                 f"output shape {tuple(outputs.shape)}")
        shared = ([self.prompts] if self.prompts is not None else [])
        shared += [t for tensors in self.adapters for t in tensors.values()]
        sums: list[torch.Tensor | None] = [None] * len(shared)
        segments, self.segments = self.segments, None
        grad = grad_outputs.to(outputs.dtype)
        del outputs
        while segments:
            entering, outputs = segments.pop()
            with torch.enable_grad():
                grad, *grads = torch.autograd.grad(outputs, [entering, *shared], grad_outputs=grad, allow_unused=True)
            sums = [s if g is None else g if s is None else s + g for s, g in zip(sums, grads)]
            del entering, outputs, grads  # this block's activations go now
            if segments and between_blocks is not None:
                between_blocks()
        sums = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(shared, sums)]
        result = SpanGrads(hidden_states=grad)
        if self.prompts is not None:
            result.deep_prompts = sums.pop(0)
        result.adapters = [{name: sums.pop(0) for name in tensors} for tensors in self.adapters]
        return result


def _same_tensor(kept: torch.Tensor | None, sent: torch.Tensor | None) -> bool:
    if kept is None or sent is None:
        return kept is sent
    return kept.shape == sent.shape and kept.dtype == sent.dtype and torch.equal(kept.detach(), sent)


class SavedBytes:
    """Counts the bytes autograd saves for backward (each storage once, the span's own weights
    not at all: they are held anyway) while leaving the tensors untouched."""

    def __init__(self, weights: set[int]) -> None:
        self.nbytes = 0
        self._seen = set(weights)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor
