"""What a request runs on the compute thread: the span's forward pass, backward pass or
inference step, and the encoding of its answer.

The answer is encoded there too, in the codec the client asked for and the dtype it sent,
which keeps a large answer's copy off the event loop.

A training call (Forward, Backward) runs block by block: between two blocks it calls the
runtime's `make_way`, which runs the inference steps waiting by then, inline on this thread,
so a decode step waits for at most one block of training, not the whole span. Nothing of the
training call is attached to the layers then (`BlockSpan.forward`: adapters one block at a
time; a kept graph has a segment per block, each with its own autograd contexts). A Forward
without a kept graph runs under no_grad, which the inline steps inherit but do not depend on:
they set their own mode (`inference_step` runs under inference_mode, a session's open under
no_grad). `training_pieces` counts the pieces training calls ran in (a call of 10 blocks: 10
for a Forward, 10 or 20 for a Backward: with a kept graph, or recomputing it).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch

from swarm.blocks import BlockSpan, InferenceState, StepArgs
from swarm.span_graph import SpanGraph
from swarm.wire import serialize_tensor, swarm_pb2

from .kept_graphs import KeptGraphs
from .lying import Liar
from .requests import InferenceStep, SpanCall


class SpanCompute:
    """The span's work for each kind of request; every method runs on the compute thread."""

    def __init__(self, span: BlockSpan, kept: KeptGraphs, make_way: Callable[[], object] | None = None,
                 liar: Liar | None = None) -> None:
        """`make_way`: called between two blocks of a training call (the runtime's `make_way`).
        `liar`: tests only (peer/lying.py), perturbs what this peer returns."""
        self.span, self.kept, self.make_way, self.liar = span, kept, make_way, liar
        self.backwards_kept = self.backwards_recomputed = 0  # how Backward calls were answered
        self.step_batches: Counter[int] = Counter()  # sessions per forward pass of decode steps -> passes
        self.training_pieces = 0

    def _between_blocks(self) -> None:
        self.training_pieces += 1  # the piece that starts now
        if self.make_way is not None:
            self.make_way()

    def forward(self, call: SpanCall) -> swarm_pb2.Tensor:
        self.training_pieces += 1
        if call.backward_id and self.kept.max_bytes:
            hidden, graph = self.span.forward_with_graph(call.inputs, self._between_blocks)
            self.kept.put(call.backward_id, graph)
        else:
            with torch.no_grad():
                hidden = self.span.forward(call.inputs, self._between_blocks)
        if self.liar is not None:
            hidden = self.liar.distort(hidden)
        return serialize_tensor(hidden.to(call.client_dtype), call.response_codec)

    def backward(self, call: SpanCall, grad_outputs: torch.Tensor, adapter_msgs,
                 graph: SpanGraph | None) -> swarm_pb2.BackwardResponse:
        self.training_pieces += 1
        if graph is not None and graph.matches(call.inputs):
            grads = graph.backward(grad_outputs, self._between_blocks)
            self.backwards_kept += 1
        else:
            self.backwards_recomputed += 1
            grads = self.span.backward(call.inputs, grad_outputs, self._between_blocks)
        codec = call.response_codec
        grad_inputs = grads.hidden_states if self.liar is None else self.liar.distort(grads.hidden_states)
        response = swarm_pb2.BackwardResponse(
            grad_hidden_states=serialize_tensor(grad_inputs.to(call.client_dtype), codec))
        if grads.deep_prompts is not None:
            response.grad_deep_prompts.CopyFrom(serialize_tensor(grads.deep_prompts, codec))
        for msg, tensors in zip(adapter_msgs, grads.adapters):
            response.grad_adapters.add(method=msg.method, config_json=msg.config_json,
                                       tensors={name: serialize_tensor(t, codec) for name, t in tensors.items()})
        return response

    def inference_step(self, state: InferenceState, step: InferenceStep,
                       codec: str) -> tuple[swarm_pb2.Tensor, float, float]:
        """The step's encoded output, and the seconds spent computing and encoding it."""
        result = self.inference_steps([(state, step, codec)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def inference_steps(self, items: list[tuple[InferenceState, InferenceStep, str]]) -> list:
        """Steps of several sessions, run together where they can be (swarm/step_batch.py):
        for each, its encoded output and the seconds spent computing and encoding (the joined
        pass's, for a step that ran in one), or the error that refused it."""
        started = time.perf_counter()
        run = self.span.inference_steps([StepArgs(state, step.hidden_states, step.attention_mask, step.position_ids,
                                                  step.hypo_ids, step.position) for state, step, _ in items])
        computed = time.perf_counter()
        self.step_batches.update(run.passes)
        answers = []
        for (_, step, codec), hidden in zip(items, run.results):
            if isinstance(hidden, Exception):
                answers.append(hidden)
                continue
            encoding = time.perf_counter()
            if self.liar is not None:
                hidden = self.liar.distort(hidden)
            encoded = serialize_tensor(hidden.to(step.client_dtype), codec)
            answers.append((encoded, computed - started, time.perf_counter() - encoding))
        return answers
