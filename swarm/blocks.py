"""Running a span of blocks [start, end): forward, backward (from a kept graph or by
recomputation), and incremental inference with a KV cache owned by the span.

The same code serves a peer and the local reference in tests: a span is the library's own
decoder layers, driven exactly as the family's model forward drives them, so outputs are
those of transformers up to floating-point reordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .models import ModelFamily
from .tuning import AdapterSet, AppliedAdapters, adapters_applied


class SpanInputError(ValueError):
    """A request does not fit this span (shapes, lengths, positions); says what would."""


@dataclass
class SpanGrads:
    """Gradients a Backward call returns: w.r.t. the span's input hidden states, its deep
    prompts (when sent) and each adapter set's tensors (same names as sent)."""

    hidden_states: torch.Tensor
    deep_prompts: torch.Tensor | None = None
    adapters: list[dict[str, torch.Tensor]] = field(default_factory=list)


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


class SpanGraph:
    """A span's forward pass with its autograd graph, waiting for the gradient of its output."""

    def __init__(self, outputs: torch.Tensor, inputs: torch.Tensor, prompts: torch.Tensor | None,
                 adapters: list[dict[str, torch.Tensor]], nbytes: int) -> None:
        self.outputs, self.inputs, self.prompts, self.adapters = outputs, inputs, prompts, adapters
        self.nbytes = nbytes  # what autograd saved for backward: the memory this graph holds

    def matches(self, hidden_states: torch.Tensor, deep_prompts: torch.Tensor | None,
                adapters: list[AdapterSet]) -> bool:
        """Whether these are exactly the inputs, deep prompts and tuning tensors this graph was built
        from. A peer checks before answering a Backward from a kept graph (a memcmp of what was sent,
        ~0.1 ms for 4 x 64 tokens): a client that reuses an id with other inputs gets a
        recomputation, never a wrong gradient."""
        if not _same_tensor(self.inputs, hidden_states) or not _same_tensor(self.prompts, deep_prompts):
            return False
        if len(self.adapters) != len(adapters):
            return False
        return all(kept.keys() == sent.tensors.keys() and all(_same_tensor(kept[k], sent.tensors[k]) for k in kept)
                   for kept, sent in zip(self.adapters, adapters))

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


class _SavedBytes:
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
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        # The compute dtype: quantized linears (swarm.quant) may hold integer parameters.
        return next(p.dtype for p in self.layers.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    # --- stateless ----------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        deep_prompts: torch.Tensor | None = None,
        adapters: list[AdapterSet] = (),
    ) -> torch.Tensor:
        """Hidden states through all blocks of the span, no cache."""
        batch, seq = self._check_hidden(hidden_states)
        attention_mask = self._check_mask(attention_mask, batch, seq)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, 0, seq, batch, hidden_states.device)
        self._check_positions(position_ids, batch, seq)
        before_block = self._deep_prompt_adder(deep_prompts, batch, past=0, new=seq)
        with adapters_applied(self.layers, self.start, list(adapters)) as applied:
            cache = None
            if applied.prefix_length:
                # A cache of this call only, holding the prefix; it stays connected to the
                # prefix tensors, so Backward gets their gradients.
                cache = self.family.new_cache(self.span_config)
                self._prefill(cache, applied, batch)
                attention_mask, position_ids = _behind_prefix(applied.prefix_length, attention_mask, position_ids)
            return self.family.run_layers(
                self.layers, self.rotary, self.span_config, self.start, hidden_states,
                attention_mask, position_ids, cache=cache, before_block=before_block,
            )

    def backward(
        self,
        hidden_states: torch.Tensor,
        grad_outputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        deep_prompts: torch.Tensor | None = None,
        adapters: list[AdapterSet] = (),
    ) -> SpanGrads:
        """Recomputes the forward pass with autograd and returns the gradients of
        ``(outputs * grad_outputs).sum()``; the blocks' own weights get no gradient."""
        if grad_outputs.shape != hidden_states.shape:
            raise SpanInputError(
                f"grad_outputs shape {tuple(grad_outputs.shape)} must equal hidden_states shape "
                f"{tuple(hidden_states.shape)}"
            )
        _, graph = self.forward_with_graph(hidden_states, attention_mask, position_ids, deep_prompts, adapters)
        return graph.backward(grad_outputs)

    def forward_with_graph(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        deep_prompts: torch.Tensor | None = None,
        adapters: list[AdapterSet] = (),
    ) -> tuple[torch.Tensor, "SpanGraph"]:
        """`forward`, keeping what autograd saved so `SpanGraph.backward` needs no recomputation:
        a training step then costs forward + backward instead of forward + forward + backward."""
        inputs = hidden_states.detach().requires_grad_(True)
        prompts = deep_prompts.detach().requires_grad_(True) if deep_prompts is not None else None
        leaf_sets = [
            AdapterSet(a.method, {k: t.detach().requires_grad_(True) for k, t in a.tensors.items()}) for a in adapters
        ]
        saved = _SavedBytes(self._weight_storages())
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            outputs = self.forward(inputs, attention_mask, position_ids, prompts, leaf_sets)
        graph = SpanGraph(outputs, inputs, prompts, [a.tensors for a in leaf_sets], saved.nbytes)
        return outputs.detach(), graph

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
            self._check_deep_prompts(deep_prompts, batch_size)
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
        """
        # Everything is checked before the session changes: a refused step leaves it as it was.
        batch, new = self._check_hidden(hidden_states, expected_batch=state.batch_size)
        past = state.position if position is None else position
        if not 0 <= past <= state.position:
            raise SpanInputError(f"step position {past} is ahead of the {state.position} tokens this session holds")
        if past + new > state.max_length:
            raise SpanInputError(
                f"session holds {past} tokens; {new} more exceed its max_length {state.max_length}"
            )
        if hypo_ids is not None:
            hypo_ids = self._check_hypo_ids(state, hypo_ids)
        attention_mask = self._check_mask(attention_mask, batch, new)
        if position_ids is not None:
            self._check_positions(position_ids, batch, new)

        if past < state.position:
            self._rollback(state, past)
        if hypo_ids is not None:
            self._reorder(state, hypo_ids)
        full_mask = state.attention_mask
        if attention_mask is not None or full_mask is not None:
            if full_mask is None:
                full_mask = torch.ones(batch, past, dtype=torch.long, device=hidden_states.device)
            if attention_mask is None:
                attention_mask = torch.ones(batch, new, dtype=torch.long, device=hidden_states.device)
            full_mask = torch.cat([full_mask, attention_mask], dim=1)
        if position_ids is None:
            position_ids = default_position_ids(full_mask, past, new, batch, hidden_states.device)
        layer_mask = full_mask
        if state.prefix_length:
            layer_mask, position_ids = _behind_prefix(state.prefix_length, full_mask, position_ids)
        before_block = self._deep_prompt_adder(state.deep_prompts, batch, past=past, new=new)
        with adapters_applied(self.layers, self.start, state.adapters, checked=True):  # at start_inference
            outputs = self.family.run_layers(
                self.layers, self.rotary, self.span_config, self.start, hidden_states,
                layer_mask, position_ids, cache=state.cache, before_block=before_block,
            )
        # Committed only now: a step refused above, or failing in the layers, leaves the
        # padding mask and position as they were.
        state.attention_mask = full_mask
        state.position = past + new
        return outputs

    @staticmethod
    def _rollback(state: InferenceState, position: int) -> None:
        state.cache.crop(position - state.position)
        if state.attention_mask is not None:
            state.attention_mask = state.attention_mask[:, :position]
        state.position = position

    @staticmethod
    def _check_hypo_ids(state: InferenceState, hypo_ids: torch.Tensor) -> torch.Tensor:
        if hypo_ids.shape != (state.batch_size,) or hypo_ids.is_floating_point() or hypo_ids.dtype == torch.bool:
            raise SpanInputError(f"hypo_ids must be integers of shape ({state.batch_size},), got "
                                 f"{hypo_ids.dtype} {tuple(hypo_ids.shape)}")
        hypo_ids = hypo_ids.long()
        if hypo_ids.numel() and (hypo_ids.min() < 0 or hypo_ids.max() >= state.batch_size):
            raise SpanInputError(f"hypo_ids must be in [0, {state.batch_size})")
        return hypo_ids

    @staticmethod
    def _reorder(state: InferenceState, hypo_ids: torch.Tensor) -> None:
        state.cache.reorder_cache(hypo_ids)
        if state.attention_mask is not None:
            state.attention_mask = state.attention_mask[hypo_ids]

    # --- checks and helpers -------------------------------------------------------------------

    def _prefill(self, cache: Cache, applied: AppliedAdapters, batch: int) -> None:
        """Puts each layer's prefix keys/values in the cache, as PEFT's past_key_values would be."""
        for i, (keys, values) in enumerate(applied.kv_prefixes):
            cache.update(keys.to(self.dtype).unsqueeze(0).expand(batch, -1, -1, -1),
                         values.to(self.dtype).unsqueeze(0).expand(batch, -1, -1, -1), i)

    def _deep_prompt_adder(self, deep_prompts: torch.Tensor | None, batch: int, past: int, new: int):
        """Deep prompts are added to the hidden states of the first ``prefix`` positions
        before each block (P-tuning v2 on hidden states); only positions inside this call's
        window [past, past + new) are touched."""
        if deep_prompts is None:
            return None
        self._check_deep_prompts(deep_prompts, batch)
        prefix = deep_prompts.shape[2]
        lo, hi = past, min(past + new, prefix)
        if lo >= hi:
            return None

        def add(block: int, hidden: torch.Tensor) -> torch.Tensor:
            prompt = deep_prompts[block - self.start, :, lo:hi].to(hidden.dtype)
            head = hidden[:, : hi - lo] + prompt
            return torch.cat([head, hidden[:, hi - lo:]], dim=1)

        return add

    def _check_deep_prompts(self, deep_prompts: torch.Tensor, batch: int) -> None:
        shape = tuple(deep_prompts.shape)
        if (len(shape) != 4 or shape[0] != self.num_blocks or shape[1] not in (1, batch)
                or shape[3] != self.hidden_size):
            raise SpanInputError(
                f"deep_prompts must have shape ({self.num_blocks}, {batch} or 1, prefix, {self.hidden_size}), "
                f"got {shape}"
            )

    def _check_hidden(self, hidden_states: torch.Tensor, expected_batch: int | None = None) -> tuple[int, int]:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise SpanInputError(
                f"hidden_states must have shape (batch, seq, {self.hidden_size}), got {tuple(hidden_states.shape)}"
            )
        batch, seq = hidden_states.shape[:2]
        if seq < 1 or batch < 1:
            raise SpanInputError(f"hidden_states must hold at least one token, got shape {tuple(hidden_states.shape)}")
        if expected_batch is not None and batch != expected_batch:
            raise SpanInputError(f"session was opened for batch {expected_batch}, step has batch {batch}")
        return batch, seq

    @staticmethod
    def _check_mask(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if tuple(attention_mask.shape) != (batch, seq):
            raise SpanInputError(f"attention_mask must have shape ({batch}, {seq}), got {tuple(attention_mask.shape)}")
        return attention_mask.long()

    @staticmethod
    def _check_positions(position_ids: torch.Tensor, batch: int, seq: int) -> None:
        if position_ids.shape[-1] != seq or position_ids.shape[0] not in (1, batch) or position_ids.ndim != 2:
            raise SpanInputError(f"position_ids must have shape ({batch}, {seq}), got {tuple(position_ids.shape)}")
