"""What a request runs on the compute thread: the span's forward pass, backward pass or
inference step, and the encoding of its answer.

The answer is encoded there too, in the codec the client asked for and the dtype it sent,
which keeps a large answer's copy off the event loop.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from swarm.blocks import BlockSpan, InferenceState, StepArgs
from swarm.span_graph import SpanGraph
from swarm.wire import serialize_tensor, swarm_pb2

from .kept_graphs import KeptGraphs
from .requests import InferenceStep, SpanCall


class SpanCompute:
    """The span's work for each kind of request; every method runs on the compute thread."""

    def __init__(self, span: BlockSpan, kept: KeptGraphs) -> None:
        self.span, self.kept = span, kept
        self.backwards_kept = self.backwards_recomputed = 0  # how Backward calls were answered
        self.step_batches: Counter[int] = Counter()  # sessions per forward pass of decode steps -> passes

    def forward(self, call: SpanCall) -> swarm_pb2.Tensor:
        if call.backward_id and self.kept.max_bytes:
            hidden, graph = self.span.forward_with_graph(call.inputs)
            self.kept.put(call.backward_id, graph)
        else:
            with torch.no_grad():
                hidden = self.span.forward(call.inputs)
        return serialize_tensor(hidden.to(call.client_dtype), call.response_codec)

    def backward(self, call: SpanCall, grad_outputs: torch.Tensor, adapter_msgs,
                 graph: SpanGraph | None) -> swarm_pb2.BackwardResponse:
        if graph is not None and graph.matches(call.inputs):
            grads = graph.backward(grad_outputs)
            self.backwards_kept += 1
        else:
            self.backwards_recomputed += 1
            grads = self.span.backward(call.inputs, grad_outputs)
        codec = call.response_codec
        response = swarm_pb2.BackwardResponse(
            grad_hidden_states=serialize_tensor(grads.hidden_states.to(call.client_dtype), codec))
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
            encoded = serialize_tensor(hidden.to(step.client_dtype), codec)
            answers.append((encoded, computed - started, time.perf_counter() - encoding))
        return answers
