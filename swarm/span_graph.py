"""A span's forward pass kept with its autograd graph (`SpanGraph`), the gradients a backward
pass through it returns (`SpanGrads`), and the count of the memory such a graph holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """A span's forward pass with its autograd graph, waiting for the gradient of its output."""

    def __init__(self, outputs: torch.Tensor, leaves: SpanInputs, nbytes: int) -> None:
        self.outputs, self.inputs, self.prompts = outputs, leaves.hidden_states, leaves.deep_prompts
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

    def backward(self, grad_outputs: torch.Tensor) -> SpanGrads:
        """Gradients of ``(outputs * grad_outputs).sum()``; frees the graph (one use only)."""
        if self.outputs is None:
            raise RuntimeError("this forward's graph was already used by a Backward")
        if grad_outputs.shape != self.outputs.shape:
            raise SpanInputError(f"grad_outputs shape {tuple(grad_outputs.shape)} must equal the forward's "
                                 f"output shape {tuple(self.outputs.shape)}")
        leaves = [self.inputs] + ([self.prompts] if self.prompts is not None else [])
        leaves += [t for tensors in self.adapters for t in tensors.values()]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.outputs, leaves, grad_outputs=grad_outputs.to(self.outputs.dtype),
                                        allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        self.outputs = None  # the graph is spent; drop the saved activations now
        result = SpanGrads(hidden_states=grads.pop(0))
        if self.prompts is not None:
            result.deep_prompts = grads.pop(0)
        result.adapters = [{name: grads.pop(0) for name in tensors} for tensors in self.adapters]
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
