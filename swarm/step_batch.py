"""Decode steps of several inference sessions run as one forward pass over a span.

On a peer shared by many clients, each client's decode step is one token per sequence: alone
it reads every weight of the span to do a few multiply-adds per weight, so the steps of
sessions waiting at the same moment are run together, their rows stacked, reading the
weights once.

Each session keeps its own KV cache (`InferenceState`), so sessions come and go freely and
roll back or reorder beams on their own. For the joined pass the caches are side by side,
each left-padded to the longest: a padded column is masked for its row, so every row attends
to exactly its own session's keys, at its own positions; ALiBi and sliding windows count from
the mask and the positions, as for any left-padded batch. Sessions that keep stepping together
keep that arrangement between passes (swarm/joined_cache.py: each pass writes one column in
place); where it does not fit, a pass lays the caches out for itself (`_JoinedLayer`: one copy
of the sessions' caches per layer, on top of the append each makes).

Sessions' first steps (their prompts) join too, in a pass of their own (swarm/joined_prompts.py).
What runs apart, as it would alone: other steps of more than one token, steps still inside the
session's deep prompts, sessions whose adapters hook the layers (LoRA, IA3, bottleneck: their
hooks would apply to every row; a prefix lives in the cache and joins decode steps), and a
session's second step in one round (it must see the first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .joined_cache import JoinedCache, arrange
from .joined_prompts import joinable_prompt, run_prompts
from .tuning import AdapterSet


@dataclass
class InferenceState:
    """One inference session's memory on this span: KV cache, padding mask so far, and the
    client tensors fixed for the session. A key/value prefix (prefix tuning) sits in the cache
    ahead of the session's tokens; `position` and the mask count only the session's tokens."""

    cache: Cache
    batch_size: int
    max_length: int
    position: int = 0
    attention_mask: torch.Tensor | None = None  # (batch, position), None while all ones
    deep_prompts: torch.Tensor | None = None
    adapters: list[AdapterSet] = field(default_factory=list)
    prefix_length: int = 0
    joined: JoinedCache | None = field(default=None, repr=False, compare=False)  # swarm/joined_cache.py

    @property
    def joinable(self) -> bool:
        """Whether its decode steps may share a forward pass with other sessions'."""
        return not any(a.method.hooks_layers for a in self.adapters)


class StepArgs(NamedTuple):
    """One session's step, as `BlockSpan.inference_step` takes it."""

    state: InferenceState
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    hypo_ids: torch.Tensor | None = None
    position: int | None = None


@dataclass
class PreparedStep:
    """A step checked against its session, the session readied for it (rolled back, beams
    reordered): what enters the layers, and what the session becomes once they have run."""

    state: InferenceState
    hidden_states: torch.Tensor
    past: int
    new: int
    full_mask: torch.Tensor | None  # the session's padding mask after the step
    layer_mask: torch.Tensor | None  # what the layers see: with ones for a prefix
    position_ids: torch.Tensor  # behind a prefix, if any
    in_prompts: bool  # deep prompts add to some of its positions

    def commit(self) -> None:
        self.state.attention_mask = self.full_mask
        self.state.position = self.past + self.new


class StepsRun(NamedTuple):
    results: list  # per step, in order: its output, or the error that refused it
    passes: list[int]  # how many sessions' steps each forward pass ran, e.g. [3, 1]


def run_steps(span, steps: list[StepArgs]) -> StepsRun:
    """Each step's output (or the error that refused it), in order: the joinable ones in one
    forward pass, the rest one by one."""
    results: list = [None] * len(steps)
    passes: list[int] = []
    seen, later, prepared = set(), [], {}
    for i, args in enumerate(steps):
        if id(args.state) in seen:  # the session's next step: after this one has run
            later.append(i)
            continue
        seen.add(id(args.state))
        try:
            prepared[i] = span.prepare_step(*args)
        except Exception as e:  # noqa: BLE001 - this session's error, not the others'
            results[i] = e
    for joinable, run in ((_joinable, _run_joined), (joinable_prompt, run_prompts)):
        joined = [i for i, step in prepared.items() if joinable(span, step)]
        if len(joined) < 2:
            continue
        try:
            outputs = run(span, [prepared[i] for i in joined])
        except Exception as e:  # noqa: BLE001 - the pass failed: every step in it did
            outputs = [e] * len(joined)
        passes.append(len(joined))
        for i, output in zip(joined, outputs):
            results[i] = output
            del prepared[i]
    for i, step in prepared.items():
        results[i] = _alone(span.run_prepared, step)
        passes.append(1)
    for i in later:
        results[i] = _alone(lambda args: span.run_prepared(span.prepare_step(*args)), steps[i])
        passes.append(1)
    return StepsRun(results, passes)


def _alone(fn, arg):
    try:
        return fn(arg)
    except Exception as e:  # noqa: BLE001 - this session's error, not the others'
        return e


def _joinable(span, step: PreparedStep) -> bool:
    cache = step.state.cache
    return (step.new == 1 and not step.in_prompts and step.state.joinable
            and len(cache.layers) == span.length and cache.get_seq_length() > 0)


def _run_joined(span, steps: list[PreparedStep]) -> list[torch.Tensor]:
    arranged = arrange([step.state for step in steps])
    if arranged is None:
        return _run_laid_out(span, steps)
    joined, order = arranged
    in_rows = [None] * len(steps)
    for step, i in zip(steps, order):
        in_rows[i] = step
    outputs = _run_pass(span, in_rows, joined.pads, joined.pass_layers())
    joined.advance()
    return [outputs[i] for i in order]


def _run_laid_out(span, steps: list[PreparedStep]) -> list[torch.Tensor]:
    """The pass with the caches laid out for it alone (they do not fit an arrangement)."""
    lengths = [step.state.cache.get_seq_length() for step in steps]  # a prefix included
    longest = max(lengths)
    rows = [step.hidden_states.shape[0] for step in steps]
    layers = [_JoinedLayer([step.state.cache.layers[i] for step in steps], rows, lengths, longest)
              for i in range(span.length)]
    try:
        return _run_pass(span, steps, [longest - length for length in lengths], layers)
    except BaseException:
        for step, length in zip(steps, lengths):  # layers that ran appended a column: take it back
            for layer in step.state.cache.layers:
                if layer.get_seq_length() > length:
                    layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        raise


def _run_pass(span, steps: list[PreparedStep], pads: list[int], layers: list[DynamicLayer]) -> list[torch.Tensor]:
    """One forward pass of the steps' rows, in order, each session's mask left-padded by its pad;
    each step's output, the steps committed."""
    masks = []
    for step, pad in zip(steps, pads):
        mask = step.layer_mask
        if mask is None:
            mask = torch.ones(step.hidden_states.shape[0], step.state.cache.get_seq_length() + 1, dtype=torch.long,
                              device=step.hidden_states.device)
        masks.append(torch.nn.functional.pad(mask.long(), (pad, 0)))
    outputs = span.family.run_layers(
        span.layers, span.rotary, span.span_config, span.start,
        torch.cat([step.hidden_states for step in steps]), torch.cat(masks),
        torch.cat([step.position_ids for step in steps]), cache=Cache(layers=layers),
    )
    for step in steps:
        step.commit()
    return list(outputs.split([step.hidden_states.shape[0] for step in steps]))


class _JoinedLayer(DynamicLayer):
    """One layer's cache for a joined pass: appends each session's new keys/values to its own
    cache, and hands attention all of them side by side, each left-padded to the longest."""

    def __init__(self, sessions: list[DynamicLayer], rows: list[int], lengths: list[int], longest: int) -> None:
        super().__init__()
        self.sessions, self.rows, self.lengths, self.longest = sessions, rows, lengths, longest
        self.keys, self.values = sessions[0].keys, sessions[0].values  # device and dtype, for whoever asks
        self.is_initialized = True

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.longest

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty(batch, heads, self.longest + new, dim)
        values = value_states.new_empty(batch, value_states.shape[1], self.longest + new, value_states.shape[-1])
        row = 0
        for layer, rows, length in zip(self.sessions, self.rows, self.lengths):
            own_keys, own_values = layer.update(key_states[row: row + rows], value_states[row: row + rows])
            pad = self.longest - length
            # Zeros, not garbage, under the mask: a NaN there would survive its zero weight.
            keys[row: row + rows, :, :pad].zero_()
            values[row: row + rows, :, :pad].zero_()
            keys[row: row + rows, :, pad:].copy_(own_keys)
            values[row: row + rows, :, pad:].copy_(own_values)
            row += rows
        return keys, values
