"""The inputs of one span call (`SpanInputs`) and their checks against the span.

These are the checks that hold whoever calls: shapes against the span's hidden size, number
of blocks and the call's batch, mask values. An inference step takes the same inputs one step
at a time and runs the same check functions. What depends on a peer's limits (batch and length
caps, message sizes, finite values, wire dtypes) is the peer's, not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .tuning import AdapterSet


class SpanInputError(ValueError):
    """A request does not fit this span (shapes, lengths, positions); says what would."""


class SpanShape(Protocol):
    """What the checks need of a span (a `swarm.blocks.BlockSpan`)."""

    hidden_size: int
    length: int  # blocks in the span


@dataclass(frozen=True, eq=False)
class SpanInputs:
    """What a Forward or Backward runs through a span. ``attention_mask`` is (batch, seq) of
    0/1; ``position_ids`` (batch or 1, seq), derived from the mask when None; ``deep_prompts``
    (num_blocks, batch or 1, prefix, hidden size), added before each block."""

    hidden_states: torch.Tensor  # (batch, seq, hidden size)
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    deep_prompts: torch.Tensor | None = None
    adapters: list[AdapterSet] = field(default_factory=list)
    # The span these inputs were checked for (`checked`); None until then.
    checked_for: SpanShape | None = field(default=None, init=False, repr=False, compare=False)

    def checked(self, span: SpanShape) -> SpanInputs:
        """These inputs, checked for `span` (mask as int64); raises SpanInputError naming the
        bad value. Inputs already checked for this span come back as they are: the checks run
        once, where the inputs enter (a peer's request decoder, or the span's own methods)."""
        if self.checked_for is span:
            return self
        batch, seq = check_hidden(self.hidden_states, span.hidden_size)
        if self.position_ids is not None:
            check_positions(self.position_ids, batch, seq)
        if self.deep_prompts is not None:
            check_deep_prompts(self.deep_prompts, span.length, batch, span.hidden_size)
        return self._still_checked(span, attention_mask=check_mask(self.attention_mask, batch, seq),
                                   adapters=list(self.adapters))

    def to(self, device: torch.device, dtype: torch.dtype) -> SpanInputs:
        """On `device`, hidden states in `dtype`; the other tensors keep theirs. Still checked:
        moving changes no shape."""
        mask, positions, prompts = (None if t is None else t.to(device)
                                    for t in (self.attention_mask, self.position_ids, self.deep_prompts))
        return self._still_checked(self.checked_for, hidden_states=self.hidden_states.to(device, dtype),
                                   attention_mask=mask, position_ids=positions, deep_prompts=prompts)

    def with_tensors(self, **tensors) -> SpanInputs:
        """The same inputs with some tensors swapped for ones of the same shapes (e.g. autograd
        leaves); as checked as these."""
        return self._still_checked(self.checked_for, **tensors)

    def _still_checked(self, span: SpanShape | None, **changes) -> SpanInputs:
        result = replace(self, **changes)
        object.__setattr__(result, "checked_for", span)
        return result


def check_hidden(hidden_states: torch.Tensor, hidden_size: int, expected_batch: int | None = None) -> tuple[int, int]:
    """(batch, seq) of hidden states of shape (batch, seq, hidden_size), at least one token."""
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != hidden_size:
        raise SpanInputError(
            f"hidden_states must have shape (batch, seq, {hidden_size}), got {tuple(hidden_states.shape)}"
        )
    batch, seq = hidden_states.shape[:2]
    if seq < 1 or batch < 1:
        raise SpanInputError(f"hidden_states must hold at least one token, got shape {tuple(hidden_states.shape)}")
    if expected_batch is not None and batch != expected_batch:
        raise SpanInputError(f"session was opened for batch {expected_batch}, step has batch {batch}")
    return batch, seq


def check_mask(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """The mask as int64, if it is (batch, seq) of 0 and 1. Values are read: on a GPU tensor
    that waits for the device, so a peer checks masks while they are still on the CPU."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, seq):
        raise SpanInputError(f"attention_mask must have shape ({batch}, {seq}), got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.long()
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise SpanInputError("attention_mask values must be 0 (padding) or 1 (token)")
    return attention_mask


def check_positions(position_ids: torch.Tensor, batch: int, seq: int) -> None:
    if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
        raise SpanInputError(f"position_ids must have shape ({batch} or 1, {seq}), got {tuple(position_ids.shape)}")


def check_deep_prompts(deep_prompts: torch.Tensor, num_blocks: int, batch: int, hidden_size: int) -> None:
    shape = tuple(deep_prompts.shape)
    if len(shape) != 4 or shape[0] != num_blocks or shape[1] not in (1, batch) or shape[3] != hidden_size:
        raise SpanInputError(
            f"deep_prompts must have shape ({num_blocks}, {batch} or 1, prefix, {hidden_size}), got {shape}"
        )


def check_grad_outputs(grad_outputs: torch.Tensor, hidden_states: torch.Tensor) -> None:
    if grad_outputs.shape != hidden_states.shape:
        raise SpanInputError(f"grad_outputs shape {tuple(grad_outputs.shape)} must equal hidden_states shape "
                             f"{tuple(hidden_states.shape)}")


def check_hypo_ids(hypo_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """An inference step's hypo_ids (which row of the cache each row continues) as int64, if
    they are `batch` integers in [0, batch). Values are read, as for `check_mask`."""
    if hypo_ids.shape != (batch,) or hypo_ids.is_floating_point() or hypo_ids.dtype == torch.bool:
        raise SpanInputError(f"hypo_ids must be integers of shape ({batch},), got "
                             f"{hypo_ids.dtype} {tuple(hypo_ids.shape)}")
    hypo_ids = hypo_ids.long()
    if hypo_ids.numel() and (hypo_ids.min() < 0 or hypo_ids.max() >= batch):
        raise SpanInputError(f"hypo_ids must be in [0, {batch})")
    return hypo_ids
