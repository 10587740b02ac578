"""Running a span of blocks [start, end) (`BlockSpan`): forward, backward (by recomputation,
or kept for later as a `swarm.span_graph.SpanGraph`), and incremental inference with a KV
cache owned by the span (`InferenceState`). What a call takes, and its checks, are in
swarm/span_inputs.py.

A stateless call runs the blocks one at a time (masks and rotary built once), each with only
its own adapters attached and, for a kept graph, its own autograd segment; a caller may run
other work between two blocks (`between_blocks`: a peer's waiting decode steps) and finds
nothing of the call attached to the layers there.

The same code serves a peer and the local reference in tests: a span is the library's own
decoder layers, driven exactly as the family's model forward drives them, so outputs are
those of transformers up to floating-point reordering.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .models import ModelFamily
from .span_graph import SavedBytes, SpanGraph, SpanGrads
from .span_inputs import (SpanInputError, SpanInputs, check_deep_prompts, check_grad_outputs, check_hidden,
                          check_hypo_ids, check_mask, check_positions)
from .step_batch import InferenceState, PreparedStep, StepArgs, StepsRun, run_steps
from .tuning import AdapterSet, AppliedAdapters, adapters_applied, check_adapters

# Homes of their own since the split; still importable from here.
__all__ = ["BetweenBlocks", "BlockSpan", "InferenceState", "PreparedStep", "SpanGraph", "SpanGrads", "SpanInputError",
           "SpanInputs",
           "default_position_ids"]

# Called between two blocks of a stateless call (forward, backward) with nothing of the call
# attached to the layers; a peer lets waiting inference steps run there.
BetweenBlocks = Callable[[], object]


def default_position_ids(attention_mask: torch.Tensor | None, past: int, new: int, batch: int,
                         device: torch.device) -> torch.Tensor:
    """Positions as transformers' generate derives them: count of real tokens so far, so a
    left-padded row starts at 0 where its text starts."""
    if attention_mask is None:
        return torch.arange(past, past + new, device=device).unsqueeze(0).expand(batch, new)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, past: past + new]


def _behind_prefix(prefix_length: int, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The input seen behind a key/value prefix, as PEFT runs it: the mask gains ones for the
    prefix and positions start after it (its keys carry no rotary position of their own)."""
    if attention_mask is not None:
        ones = attention_mask.new_ones(attention_mask.shape[0], prefix_length)
        attention_mask = torch.cat([ones, attention_mask], dim=1)
    return attention_mask, position_ids + prefix_length


@contextlib.contextmanager
def _recording(saved: SavedBytes | None) -> Iterator[None]:
    """Autograd on, counting what it saves into `saved`, for one block of a kept graph; nothing
    when there is no graph to keep (the caller's grad mode holds)."""
    if saved is None:
        yield
        return
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        yield


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model, with its rotary embedding, ready to run."""

    def __init__(self, family: ModelFamily, span_config: PretrainedConfig, start: int, end: int,
                 layers: nn.ModuleList, rotary: nn.Module):
        super().__init__()
        self.family, self.span_config = family, span_config
        self.start, self.end = start, end
        self.layers, self.rotary = layers, rotary
        self.hidden_size = span_config.hidden_size

    @property
    def length(self) -> int:
        """How many blocks this span holds (`num_blocks` is always the model's total)."""
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        # The compute dtype: quantized linears (swarm.quant) may hold integer parameters.
        return next(p.dtype for p in self.layers.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    # --- stateless ----------------------------------------------------------------------------

    def forward(self, inputs: SpanInputs | torch.Tensor, between_blocks: BetweenBlocks | None = None) -> torch.Tensor:
        """Hidden states through all blocks of the span, no cache; `span(hidden_states)` works
        like a torch layer (autograd records it in the caller's grad mode), `span(SpanInputs(...))`
        adds a mask, positions and client tensors.

        `between_blocks`, if given, is called between two blocks: a peer runs waiting inference
        steps there, so a long call does not hold its compute thread. The call's adapters are
        applied one block at a time, so none of them is attached to the layers when it runs."""
        if isinstance(inputs, torch.Tensor):
            inputs = SpanInputs(inputs)
        return self._run_blocks(inputs.checked(self), between_blocks)

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor,
                 between_blocks: BetweenBlocks | None = None) -> SpanGrads:
        """Recomputes the forward pass with autograd and returns the gradients of
        ``(outputs * grad_outputs).sum()``; the blocks' own weights get no gradient.
        `between_blocks` as for `forward`, in both passes."""
        inputs = inputs.checked(self)
        check_grad_outputs(grad_outputs, inputs.hidden_states)
        _, graph = self.forward_with_graph(inputs, between_blocks)
        if between_blocks is not None:
            between_blocks()
        return graph.backward(grad_outputs, between_blocks)

    def forward_with_graph(self, inputs: SpanInputs,
                           between_blocks: BetweenBlocks | None = None) -> tuple[torch.Tensor, SpanGraph]:
        """`forward`, keeping what autograd saved so `SpanGraph.backward` needs no recomputation:
        a training step then costs forward + backward instead of forward + forward + backward.

        The graph is kept per block, each block's input a leaf of its own, so its backward too
        runs block by block; each block opens and closes its own autograd contexts (grad mode,
        the saved-bytes count), so `between_blocks` runs outside all of them."""
        inputs = inputs.checked(self)
        prompts = inputs.deep_prompts
        leaves = inputs.with_tensors(
            hidden_states=inputs.hidden_states.detach().requires_grad_(True),
            deep_prompts=prompts.detach().requires_grad_(True) if prompts is not None else None,
            adapters=[AdapterSet(a.method, {k: t.detach().requires_grad_(True) for k, t in a.tensors.items()})
                      for a in inputs.adapters],
        )
        saved = SavedBytes(self._weight_storages())
        segments: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs = self._run_blocks(leaves, between_blocks, saved, segments)
        return outputs.detach(), SpanGraph(segments, leaves, saved.nbytes)

    def _run_blocks(self, inputs: SpanInputs, between_blocks: BetweenBlocks | None, saved: SavedBytes | None = None,
                    segments: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The blocks one at a time, as `family.run_layers` runs them (masks and rotary built
        once), each with only its own adapters attached. With `saved` (a graph being kept),
        each block runs under autograd from its input detached as a leaf, and (input, output)
        is appended to `segments`."""
        hidden_states, attention_mask, position_ids = inputs.hidden_states, inputs.attention_mask, inputs.position_ids
        batch, seq = hidden_states.shape[:2]
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, 0, seq, batch, hidden_states.device)
        before_block = self._deep_prompt_adder(inputs.deep_prompts, past=0, new=seq)
        check_adapters(self.layers, self.start, inputs.adapters)
        cache = None
        with_prefix = [a for a in inputs.adapters if a.method.prefix_length]
        if with_prefix:
            # A cache of this call only, holding the prefix; it stays connected to the
            # prefix tensors, so Backward gets their gradients.
            cache = self.family.new_cache(self.span_config)
            with _recording(saved), adapters_applied(self.layers, self.start, with_prefix, checked=True) as applied:
                self._prefill(cache, applied, batch)
            attention_mask, position_ids = _behind_prefix(applied.prefix_length, attention_mask, position_ids)
        arguments = self.family.layer_arguments(self.rotary, self.span_config, hidden_states, attention_mask,
                                                position_ids, cache)
        for i, layer in enumerate(self.layers):
            if i and between_blocks is not None:
                between_blocks()
            if segments is not None and i:
                hidden_states = hidden_states.detach().requires_grad_(True)
            entering = hidden_states
            block = self.start + i
            with _recording(saved), adapters_applied(self.layers[i:i + 1], block, inputs.adapters, checked=True):
                if before_block is not None:
                    hidden_states = before_block(block, hidden_states)
                hidden_states = self.family.run_layer(layer, hidden_states, arguments[i])
            if segments is not None:
                saved.pack(hidden_states)  # the graph holds each block's output: counted (once)
                segments.append((entering, hidden_states))
        return hidden_states

    def _weight_storages(self) -> set[int]:
        tensors = [*self.layers.parameters(), *self.layers.buffers()]
        if isinstance(self.rotary, nn.Module):
            tensors += [*self.rotary.parameters(), *self.rotary.buffers()]
        return {t.untyped_storage().data_ptr() for t in tensors}

    # --- inference ----------------------------------------------------------------------------

    def start_inference(self, batch_size: int, max_length: int, deep_prompts: torch.Tensor | None = None,
                        adapters: list[AdapterSet] = ()) -> InferenceState:
        if batch_size < 1 or max_length < 1:
            raise SpanInputError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        if deep_prompts is not None:
            check_deep_prompts(deep_prompts, self.length, batch_size, self.hidden_size)
        cache = self.family.new_cache(self.span_config)
        # Checks every tensor against its block now: a bad session is refused when it opens.
        with adapters_applied(self.layers, self.start, list(adapters)) as applied, torch.no_grad():
            if applied.prefix_length:
                self._prefill(cache, applied, batch_size)
        return InferenceState(cache=cache, batch_size=batch_size, max_length=max_length, deep_prompts=deep_prompts,
                              adapters=list(adapters), prefix_length=applied.prefix_length)

    @torch.inference_mode()
    def inference_step(
        self,
        state: InferenceState,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """Runs new tokens through the span, appending their keys/values to the cache.

        ``attention_mask`` holds only the new tokens' columns of the padding mask; ``position``
        (if given) is how many tokens the client believes the cache holds: less than we hold
        rolls the cache back (the client is replaying or re-branching), more is an error.
        The mask and hypo ids may come on the CPU (their values are checked there, with no wait
        on the device: a peer sends them so); they are moved to the hidden states' device here.
        """
        return self.run_prepared(self.prepare_step(state, hidden_states, attention_mask, position_ids, hypo_ids,
                                                   position))

    def run_prepared(self, step: PreparedStep) -> torch.Tensor:
        """A prepared step run alone, with its session's own cache and adapters, committed."""
        state = step.state
        if state.joined is not None:  # its own tensors from now on (swarm/joined_cache.py)
            state.joined.release()
        before_block = self._deep_prompt_adder(state.deep_prompts, past=step.past, new=step.new)
        with adapters_applied(self.layers, self.start, state.adapters, checked=True):  # at start_inference
            outputs = self.family.run_layers(
                self.layers, self.rotary, self.span_config, self.start, step.hidden_states,
                step.layer_mask, step.position_ids, cache=state.cache, before_block=before_block,
            )
        # Committed only now: a step refused before, or failing in the layers, leaves the
        # padding mask and position as they were.
        step.commit()
        return outputs

    @torch.inference_mode()
    def inference_steps(self, steps: list[StepArgs]) -> StepsRun:
        """Steps of different sessions, run together where they can be (swarm/step_batch.py):
        each session's output, or the error that refused its step, in order."""
        return run_steps(self, steps)

    def prepare_step(self, state: InferenceState, hidden_states: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     hypo_ids: torch.Tensor | None = None, position: int | None = None) -> PreparedStep:
        """Checks a step against its session and readies the session for it (rolled back,
        beams reordered); what enters the layers, to be committed once they have run."""
        # Everything is checked before the session changes: a refused step leaves it as it was.
        # The session's deep prompts and adapters were checked by start_inference.
        batch, new = check_hidden(hidden_states, self.hidden_size, expected_batch=state.batch_size)
        past = state.position if position is None else position
        if not 0 <= past <= state.position:
            raise SpanInputError(f"step position {past} is ahead of the {state.position} tokens this session holds")
        if past + new > state.max_length:
            raise SpanInputError(f"step at position {past} with {new} tokens exceeds the session's "
                                 f"max_length {state.max_length}")
        device = hidden_states.device
        if hypo_ids is not None:
            hypo_ids = check_hypo_ids(hypo_ids, batch).to(device)
        attention_mask = check_mask(attention_mask, batch, new)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if position_ids is not None:
            check_positions(position_ids, batch, new)

        if past < state.position:
            self._rollback(state, past)
        if hypo_ids is not None:
            self._reorder(state, hypo_ids)
        full_mask = state.attention_mask
        if attention_mask is not None or full_mask is not None:
            if full_mask is None:
                full_mask = torch.ones(batch, past, dtype=torch.long, device=device)
            if attention_mask is None:
                attention_mask = torch.ones(batch, new, dtype=torch.long, device=device)
            full_mask = torch.cat([full_mask, attention_mask], dim=1)
        if position_ids is None:
            position_ids = default_position_ids(full_mask, past, new, batch, device)
        layer_mask = full_mask
        if state.prefix_length:
            layer_mask, position_ids = _behind_prefix(state.prefix_length, full_mask, position_ids)
        return PreparedStep(state, hidden_states, past, new, full_mask, layer_mask, position_ids,
                            in_prompts=state.deep_prompts is not None and past < state.deep_prompts.shape[2])

    @staticmethod
    def _rollback(state: InferenceState, position: int) -> None:
        state.cache.crop(position - state.position)
        if state.attention_mask is not None:
            state.attention_mask = state.attention_mask[:, :position]
        state.position = position

    @staticmethod
    def _reorder(state: InferenceState, hypo_ids: torch.Tensor) -> None:
        state.cache.reorder_cache(hypo_ids)
        if state.attention_mask is not None:
            state.attention_mask = state.attention_mask[hypo_ids]

    # --- helpers ------------------------------------------------------------------------------

    def _prefill(self, cache: Cache, applied: AppliedAdapters, batch: int) -> None:
        """Puts each layer's prefix keys/values in the cache, as PEFT's past_key_values would be."""
        for i, (keys, values) in enumerate(applied.kv_prefixes):
            cache.update(keys.to(self.dtype).unsqueeze(0).expand(batch, -1, -1, -1),
                         values.to(self.dtype).unsqueeze(0).expand(batch, -1, -1, -1), i)

    def _deep_prompt_adder(self, deep_prompts: torch.Tensor | None, past: int, new: int):
        """Deep prompts (checked) are added to the hidden states of the first ``prefix``
        positions before each block (P-tuning v2 on hidden states); only positions inside this
        call's window [past, past + new) are touched."""
        if deep_prompts is None:
            return None
        prefix = deep_prompts.shape[2]
        lo, hi = past, min(past + new, prefix)
        if lo >= hi:
            return None

        def add(block: int, hidden: torch.Tensor) -> torch.Tensor:
            prompt = deep_prompts[block - self.start, :, lo:hi].to(hidden.dtype)
            head = hidden[:, : hi - lo] + prompt
            return torch.cat([head, hidden[:, hi - lo:]], dim=1)

        return add
