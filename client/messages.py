"""The wire messages the client sends, built in one place: a span's inputs (hidden states,
mask, positions and the span's tuning tensors), Forward and Backward requests, and an
inference session's open and step messages. Nothing here talks to the network."""

from __future__ import annotations

import uuid

import torch

from swarm.dtypes import dtype_name
from swarm.wire import serialize_tensor, swarm_pb2

from .routing import Hop
from .tuning import TuningPayload


def tuning_tensors(tuning: TuningPayload, start: int, end: int
                   ) -> tuple[swarm_pb2.Tensor | None, list[swarm_pb2.AdapterTensors]]:
    """What a message for blocks [start, end) carries of the client's tuning tensors: the
    span's deep prompts (or None) and, per adapter method, the tensors of the span's blocks."""
    deep = None
    if tuning.deep_prompts is not None:
        deep = serialize_tensor(tuning.deep_prompts[start:end].detach().contiguous())
    messages = []
    for method, named in tuning.adapters:
        msg = swarm_pb2.AdapterTensors(method=method.name, config_json=method.to_json())
        for name, tensor in named.items():
            if start <= int(name.split(".", 1)[0]) < end:
                msg.tensors[name].CopyFrom(serialize_tensor(tensor.detach().contiguous()))
        messages.append(msg)
    return deep, messages


def _add_tuning(message, tuning: TuningPayload, start: int, end: int) -> None:
    """Fills `message`'s deep_prompts and adapters fields (SpanInputs and InferenceOpen have both)."""
    deep_prompts, adapters = tuning_tensors(tuning, start, end)
    if deep_prompts is not None:
        message.deep_prompts.CopyFrom(deep_prompts)
    message.adapters.extend(adapters)


def _set_indices(message, **tensors: torch.Tensor | None) -> None:
    """Sets each given integer tensor field (mask, positions, hypo ids) as int64."""
    for name, tensor in tensors.items():
        if tensor is not None:
            getattr(message, name).CopyFrom(serialize_tensor(tensor.long()))


def span_inputs(model_id: str, hop: Hop, hidden: swarm_pb2.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, tuning: TuningPayload, codec: str) -> swarm_pb2.SpanInputs:
    """Blocks [hop.start, hop.end) of a stateless call: `hidden` (already encoded) and the rest."""
    inputs = swarm_pb2.SpanInputs(model_id=model_id, start=hop.start, end=hop.end, response_codec=codec)
    inputs.hidden_states.CopyFrom(hidden)
    _set_indices(inputs, attention_mask=attention_mask, position_ids=position_ids)
    _add_tuning(inputs, tuning, hop.start, hop.end)
    return inputs


def forward_request(inputs: swarm_pb2.SpanInputs, backward_follows: bool) -> swarm_pb2.ForwardRequest:
    """A Forward of `inputs`. With `backward_follows` the peer keeps its graph under a fresh
    random id (one per hop and pass), which the Backward names to use it."""
    return swarm_pb2.ForwardRequest(inputs=inputs, backward_id=uuid.uuid4().hex if backward_follows else "")


def backward_request(forward: swarm_pb2.ForwardRequest, grad_outputs: swarm_pb2.Tensor) -> swarm_pb2.BackwardRequest:
    """The Backward of a Forward that a peer served: the same inputs, naming its kept graph."""
    return swarm_pb2.BackwardRequest(inputs=forward.inputs, grad_outputs=grad_outputs, backward_id=forward.backward_id)


def inference_open(model_id: str, session_id: str, hop: Hop, max_length: int, batch_size: int,
                   dtype: torch.dtype, codec: str, tuning: TuningPayload) -> swarm_pb2.InferenceOpen:
    """Opens a session's KV cache for blocks [hop.start, hop.end) on one peer; `dtype` is the
    activations' dtype, which every step then sends and gets back."""
    open_msg = swarm_pb2.InferenceOpen(
        model_id=model_id, session_id=session_id, start=hop.start, end=hop.end, max_length=max_length,
        batch_size=batch_size, dtype=dtype_name(dtype), response_codec=codec,
    )
    _add_tuning(open_msg, tuning, hop.start, hop.end)
    return open_msg


def inference_step(step_id: int, position: int, hidden_states: torch.Tensor, codec: str,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   hypo_ids: torch.Tensor | None = None) -> swarm_pb2.InferenceStep:
    """One step of a session: the new tokens' hidden states at `position`, and the rest."""
    step = swarm_pb2.InferenceStep(step_id=step_id, position=position)
    step.hidden_states.CopyFrom(serialize_tensor(hidden_states.detach(), codec))
    _set_indices(step, attention_mask=attention_mask, position_ids=position_ids, hypo_ids=hypo_ids)
    return step


def step_as_sent(step: swarm_pb2.InferenceStep, inputs: swarm_pb2.Tensor) -> swarm_pb2.InferenceStep:
    """`step` as one hop receives it: `inputs` as its hidden states, no push targets."""
    sent = swarm_pb2.InferenceStep()
    sent.CopyFrom(step)
    sent.ClearField("push_to")
    sent.hidden_states.CopyFrom(inputs)
    return sent
