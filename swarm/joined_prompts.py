"""The first steps (prompts) of several inference sessions run as one forward pass over a span.

When many clients start at once, each sends its prompt as its session's first step. Alone, a
short prompt reads every weight of the span for a few tokens: on this 2-core box a 4-9 token
prompt took 30-38 ms through 10 blocks of the default model against 20 for a decode step,
and 8 clients' prompts queued one behind another at each of 3 peers (time to first token 0.7-0.9
s at 8 clients, 0.1 alone). Run together, they read the weights once.

The prompts are left-padded to the longest, each session's own padding mask (if any) kept and
the padded columns masked, so every row attends to exactly its own tokens, at its own
positions. The sessions' caches start empty; each gets only its own columns of every layer's
keys and values, as if it had run alone. Only short prompts join (`MAX_TOKENS`): a longer
one keeps the cores busy by itself, and padding others to it would cost more than it saves.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Prompts up to this many tokens join: their pass is bound by reading the weights, not by the
# arithmetic, so stacking them costs little more than one.
MAX_TOKENS = 64


def joinable_prompt(span, step) -> bool:
    """Whether `step` (a PreparedStep) is a session's first step that may share a pass."""
    state = step.state
    return (1 < step.new <= MAX_TOKENS and step.past == 0 and not step.in_prompts and state.joinable
            and not state.prefix_length and state.cache.get_seq_length() == 0)


def run_prompts(span, steps: list) -> list[torch.Tensor]:
    """One forward pass of the steps' prompts; each step's output, the steps committed."""
    longest = max(step.new for step in steps)
    rows = [step.hidden_states.shape[0] for step in steps]
    pads = [longest - step.new for step in steps]
    hidden, masks, positions = [], [], []
    for step, pad in zip(steps, pads):
        hidden.append(torch.nn.functional.pad(step.hidden_states, (0, 0, pad, 0)))
        mask = step.layer_mask
        if mask is None:
            mask = torch.ones(step.hidden_states.shape[:2], dtype=torch.long, device=step.hidden_states.device)
        masks.append(torch.nn.functional.pad(mask.long(), (pad, 0)))
        positions.append(torch.nn.functional.pad(step.position_ids, (pad, 0), value=0))
    layers = [_PromptLayer([step.state.cache for step in steps], i, rows, pads) for i in range(span.length)]
    try:
        outputs = span.family.run_layers(span.layers, span.rotary, span.span_config, span.start, torch.cat(hidden),
                                         torch.cat(masks), torch.cat(positions), cache=Cache(layers=layers))
    except BaseException:
        for step in steps:  # the layers that ran filled some of the caches: empty again, as before
            step.state.cache.layers.clear()
        raise
    for step in steps:
        step.commit()
    return [out[:, pad:].contiguous() for out, pad in zip(outputs.split(rows), pads)]


class _PromptLayer(DynamicLayer):
    """One layer's cache for a joined prompt pass: each session's cache takes its own rows'
    columns (past its padding); attention gets all of them, as one left-padded batch."""

    def __init__(self, caches: list[Cache], index: int, rows: list[int], pads: list[int]) -> None:
        super().__init__()
        self.caches, self.index, self.rows, self.pads = caches, index, rows, pads

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # every session's cache starts empty

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        row = 0
        for cache, rows, pad in zip(self.caches, self.rows, self.pads):
            cache.update(key_states[row: row + rows, :, pad:], value_states[row: row + rows, :, pad:], self.index)
            row += rows
        return key_states, value_states
