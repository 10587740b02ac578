"""The caches of sessions that step together, kept side by side between their passes.

A joined pass (swarm/step_batch.py) hands attention every session's keys and values side by
side, each left-padded to the longest. Laid out afresh for every pass, that is a copy of every
session's cache in every layer at every step, on top of the append each session makes alone:
measured 2026-12-03 on 2 threads, a pass of 8 sessions over the default model's blocks 0:10
took 1.19-1.28x the step of one session holding 8 sequences (31-38 ms), and 1.06-1.09x
(30-32 ms) with the arrangement below (3 alternating pairs of processes).

Sessions that keep stepping together (the usual case: the same clients generating, round after
round) therefore share one `JoinedCache`: per layer one tensor (rows, heads, capacity, dim)
holding every member's keys (and one its values), left-padded, with room for more columns. A
pass writes its new column for every row at once and hands attention a view. Each member's own
cache layers hold views of its rows, so whatever a session does on its own (a step alone, a
rollback, reordered beams) works as before: it replaces its layer's tensors, which is how the
next pass sees that the member left the arrangement. When the members change, the arrangement
is dissolved (each member still viewing it gets a copy of its own) and a new one is laid out.

Sessions whose padding would cost more than half the memory of their keys (one long
conversation among short ones) are not arranged: their pass lays the caches out afresh, as
before, and keeps nothing. A member that steps alone dissolves its arrangement at once, so
that a session left generating on its own does not keep the others' rows alive.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicLayer

# Columns allocated ahead of the longest member, and at least a quarter more when they run out:
# the tensors are rarely reallocated (each time, one copy of every member's cache).
SLACK = 32
# At most this many padded cells per real one: the arrangement holds its padding for as long as
# its members step together, memory the peer's --cache-tokens budget does not count.
MAX_PADDING_RATIO = 0.5


class JoinedCache:
    """The KV caches of sessions (`InferenceState`s) stepping together, side by side, in a
    fixed row order. Made by `arrange`; a state's `joined` is the arrangement it is in."""

    def __init__(self, states: Sequence[Any]) -> None:
        lengths = [state.cache.get_seq_length() for state in states]
        self.length = max(lengths)  # columns in use, padding included
        self.rows = [state.batch_size for state in states]
        self.pads = [self.length - length for length in lengths]
        self._members = [weakref.ref(state) for state in states]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # No room past what the members may ever hold (a step beyond its max_length is refused).
        self.most = max(pad + state.prefix_length + state.max_length for state, pad in zip(states, self.pads))
        capacity = min(self.length + 1 + SLACK, self.most)
        for i in range(len(states[0].cache.layers)):
            self.keys.append(self._laid_out([state.cache.layers[i].keys for state in states], capacity))
            self.values.append(self._laid_out([state.cache.layers[i].values for state in states], capacity))
        self._views: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._point(states)
        for state in states:
            state.joined = self

    def _laid_out(self, tensors: list[torch.Tensor], capacity: int) -> torch.Tensor:
        first = tensors[0]
        out = first.new_empty(sum(self.rows), first.shape[1], capacity, first.shape[3])
        row = 0
        for tensor, rows, pad in zip(tensors, self.rows, self.pads):
            # Zeros, not garbage, under the padding mask: a NaN there would survive its zero weight.
            out[row: row + rows, :, :pad].zero_()
            out[row: row + rows, :, pad: self.length].copy_(tensor)
            row += rows
        return out

    def _point(self, states: Sequence[Any]) -> None:
        """Makes each member's cache layers views of its rows, and remembers them."""
        self._views = []
        row = 0
        for state, rows, pad in zip(states, self.rows, self.pads):
            views = []
            for layer, keys, values in zip(state.cache.layers, self.keys, self.values):
                layer.keys = keys[row: row + rows, :, pad: self.length]
                layer.values = values[row: row + rows, :, pad: self.length]
                views.append((layer.keys, layer.values))
            self._views.append(views)
            row += rows

    def order(self, states: Sequence[Any]) -> list[int] | None:
        """Where each of `states` sits among the members, or None unless they are exactly the
        members and none of them changed its cache on its own since the last pass."""
        if len(states) != len(self._members):
            return None
        where = {id(member()): i for i, member in enumerate(self._members)}
        order = [where.get(id(state)) for state in states]
        if None in order or len(set(order)) != len(order):
            return None
        for state, i in zip(states, order):
            for layer, (keys, values) in zip(state.cache.layers, self._views[i]):
                if layer.keys is not keys or layer.values is not values:
                    return None
        return order

    def members(self) -> list[Any]:
        """The member states in row order (all alive: `order` matched them)."""
        return [member() for member in self._members]

    def pass_layers(self) -> list[DynamicLayer]:
        """One cache layer per block for a pass of one new token per row."""
        if self.length + 1 > self.keys[0].shape[2]:
            self._grow()
        return [_ArrangedLayer(self, i) for i in range(len(self.keys))]

    def _grow(self) -> None:
        capacity = min(self.length + 1 + max(SLACK, self.length // 4), self.most)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.length].copy_(old[:, :, : self.length])
                tensors[i] = new
        self._point(self.members())

    def advance(self) -> None:
        """After a pass ran every layer: the new column is in, the members' views take it."""
        self.length += 1
        self._point(self.members())

    def release(self, moving: frozenset[int] = frozenset()) -> None:
        """Dissolves the arrangement: each member still viewing it gets copies of its own, but
        those `moving` (ids of states) into a new arrangement, which copies them from here."""
        for member in self._members:
            state = member()
            if state is None or state.joined is not self:
                continue
            state.joined = None
            if id(state) in moving:
                continue
            for layer, keys, values in zip(state.cache.layers, self.keys, self.values):
                if _shares(layer.keys, keys):
                    layer.keys = layer.keys.clone()
                if _shares(layer.values, values):
                    layer.values = layer.values.clone()
        self.keys, self.values, self._views, self._members = [], [], [], []


def arrange(states: Sequence[Any]) -> tuple[JoinedCache, list[int]] | None:
    """The arrangement for a pass of these sessions' decode steps, and where each sits in it:
    theirs as it stands if they are exactly its members, else a new one (dissolving the ones
    they were in); None if they do not fit one (their caches are laid out afresh for the pass)."""
    current = states[0].joined
    if current is not None and (order := current.order(states)) is not None:
        return current, order
    fits = _fit(states)
    moving = frozenset(id(state) for state in states) if fits else frozenset()
    for state in states:
        if state.joined is not None:
            state.joined.release(moving)
    return (JoinedCache(states), list(range(len(states)))) if fits else None


def _fit(states: Sequence[Any]) -> bool:
    def shapes(layer) -> tuple:  # what must agree between rows stacked in one tensor
        keys, values = layer.keys, layer.values
        return (type(layer), keys.dtype, keys.device, keys.shape[1], keys.shape[3:], values.shape[1],
                values.shape[3:])

    layers = [state.cache.layers for state in states]
    if any(len(own) != len(layers[0]) for own in layers):
        return False
    for i, first in enumerate(layers[0]):
        if type(first) is not DynamicLayer or any(shapes(own[i]) != shapes(first) for own in layers):
            return False
    lengths = [state.cache.get_seq_length() for state in states]
    real = sum(state.batch_size * length for state, length in zip(states, lengths))
    padded = sum(state.batch_size * (max(lengths) - length) for state, length in zip(states, lengths))
    return padded <= MAX_PADDING_RATIO * real


def _shares(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


class _ArrangedLayer(DynamicLayer):
    """One layer's cache for a pass over an arrangement: writes the new column of every row in
    place and hands attention the columns in use."""

    def __init__(self, joined: JoinedCache, index: int) -> None:
        super().__init__()
        self.joined, self.index = joined, index
        self.keys, self.values = joined.keys[index], joined.values[index]  # device and dtype, for whoever asks
        self.is_initialized = True

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.joined.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        at, keys, values = self.joined.length, self.joined.keys[self.index], self.joined.values[self.index]
        keys[:, :, at: at + 1].copy_(key_states)
        values[:, :, at: at + 1].copy_(value_states)
        return keys[:, :, : at + 1], values[:, :, : at + 1]
