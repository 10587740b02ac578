"""Untrusted request messages -> checked tensors on the span's device, before any compute.

Every check raises where the bad value is first seen, with a message naming the value and
what would be valid:

- `BadRequest`, and the core's `WireError` / `SpanInputError` / `AdapterError`, mean the
  request itself is malformed (INVALID_ARGUMENT);
- `NotServed` means a well-formed request for a model or span this peer does not serve
  (FAILED_PRECONDITION): the client should ask another peer.

What comes out is plain data (`SpanCall`, `InferenceOpen`, `InferenceStep`: the checked forms
of the proto messages of those names) that the service hands to the runtime; nothing here
computes. A large request is decoded off the event loop (`decode`).

Checked here is what is this peer's policy: its limits (batch, length, message elements),
finite values, the dtypes the wire may carry. How the inputs fit the span is the core's check:
`SpanInputs.checked` for a span call (run here, on the CPU, before the tensors are moved),
`BlockSpan.start_inference` and `inference_step` for a session.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

from swarm.blocks import BlockSpan
from swarm.span_inputs import SpanInputs, check_grad_outputs
from swarm.tuning import AdapterError, AdapterSet, method_from_json
from swarm.wire import CODECS, DTYPES, deserialize_tensor, swarm_pb2

from .config import PeerLimits

FLOAT_DTYPES = {name: dtype for name, dtype in DTYPES.items() if dtype.is_floating_point}
INDEX_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8)
MAX_ADAPTER_SETS = 8  # methods stacked in one request; each is bounded per block by its own limit
MAX_SETTINGS_CHARS = 64 * 1024  # an adapter's config_json: settings are a few numbers and names
# Requests bigger than this are decoded off the event loop, so that copying and checking a
# large training batch (up to --max-message-mb) does not delay other sessions' tokens.
DECODE_INLINE_BYTES = 1 << 20
# Tensors up to this many elements are checked for NaN/inf by numpy: a decode step is checked
# with cold caches (the peer sat idle while others computed), where numpy's isfinite took
# ~70 us against ~200 us for torch's isfinite().all() on (1, 1, 576). Larger ones: torch's,
# which uses every thread.
NUMPY_CHECK_ELEMENTS = 1 << 16
NUMPY_FLOATS = (torch.float32, torch.float16, torch.float64)


class BadRequest(ValueError):
    """The request breaks the protocol or this peer's limits (INVALID_ARGUMENT)."""


class NotServed(Exception):
    """The request is for a model or span this peer does not serve (FAILED_PRECONDITION)."""


class UnparsableRequest(BadRequest):
    """The request's bytes are not a protobuf message of the RPC's request type."""


def request_parser(message_type: type[Message]) -> Callable[[bytes], Message]:
    """A gRPC request deserializer that raises UnparsableRequest, naming the type and size,
    on bytes that do not parse (gRPC itself would answer such a request UNKNOWN)."""
    type_name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            raise UnparsableRequest(f"the request ({len(data)} bytes) is not a valid {type_name} message: {e}; "
                                    "build requests with the code generated from protos/swarm.proto") from None

    return parse


async def decode(nbytes: int, decode_fn: Callable, *args):
    """`decode_fn(*args)` for a request with `nbytes` of tensors: inline if small, else on a thread."""
    if nbytes <= DECODE_INLINE_BYTES:
        return decode_fn(*args)
    return await asyncio.to_thread(decode_fn, *args)


def tensor_bytes(msg: Message) -> int:
    """Bytes of the tensors in a SpanInputs or InferenceOpen message (what decoding copies)."""
    fields = msg.DESCRIPTOR.fields_by_name
    total = sum(len(getattr(msg, name).data) for name in ("hidden_states", "deep_prompts")
                if name in fields and msg.HasField(name))
    return total + sum(len(t.data) for adapters in msg.adapters for t in adapters.tensors.values())


@dataclass
class SpanCall:
    """A checked Forward/Backward request: the span's inputs and what only the wire has."""

    inputs: SpanInputs  # checked for the span; on its device, hidden states in its dtype
    client_dtype: torch.dtype  # what the client sent, and gets back
    response_codec: str
    backward_id: str = ""  # names the graph a Forward keeps for its Backward ("": none)


@dataclass
class InferenceOpen:
    session_id: str
    batch_size: int
    max_length: int
    client_dtype: torch.dtype | None  # None: whatever each step sends
    response_codec: str
    deep_prompts: torch.Tensor | None = None
    adapters: list[AdapterSet] = field(default_factory=list)


@dataclass
class InferenceStep:
    """A step, checked against this peer's limits; `BlockSpan.inference_step` checks it
    against the session."""

    step_id: int
    position: int
    hidden_states: torch.Tensor  # on the span's device, in its dtype
    client_dtype: torch.dtype
    # The mask and hypo_ids stay on the CPU: inference_step reads their values there (no wait
    # on the device), then moves them.
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # on the span's device
    hypo_ids: torch.Tensor | None = None


class RequestDecoder:
    """Decodes and checks requests for one served span."""

    def __init__(self, span: BlockSpan, model_id: str, limits: PeerLimits) -> None:
        self.span, self.model_id, self.limits = span, model_id, limits
        self.hidden_size = span.hidden_size
        self._device, self._dtype = span.device, span.dtype

    # --- the three kinds of request ----------------------------------------------------------

    def span_call(self, msg: swarm_pb2.SpanInputs, backward_id: str = "") -> SpanCall:
        self._check_target(msg.model_id, msg.start, msg.end)
        codec = self._codec(msg.response_codec)
        if not msg.HasField("hidden_states"):
            raise BadRequest("hidden_states is missing")
        hidden = self._hidden_states(msg.hidden_states)
        batch, seq = hidden.shape[:2]
        inputs = SpanInputs(hidden, self._attention_mask(msg, batch, seq), self._position_ids(msg, batch, seq),
                            self._deep_prompts(msg, batch), self._adapters(msg.adapters))
        # Checked on the CPU (mask values are read), then moved: still checked on the device.
        inputs = inputs.checked(self.span).to(self._device, self._dtype)
        return SpanCall(inputs=inputs, client_dtype=hidden.dtype, response_codec=codec, backward_id=backward_id)

    def grad_outputs(self, request: swarm_pb2.BackwardRequest, call: SpanCall) -> torch.Tensor:
        """Checked here, not only by the span: a bad one must not use up the kept graph it names."""
        if not request.HasField("grad_outputs"):
            raise BadRequest("grad_outputs is missing")
        hidden = call.inputs.hidden_states
        grad = self._floating(request.grad_outputs, "grad_outputs", hidden.numel())
        check_grad_outputs(grad, hidden)
        return grad.to(self._device, self._dtype)

    def inference_open(self, msg: swarm_pb2.InferenceOpen) -> InferenceOpen:
        self._check_target(msg.model_id, msg.start, msg.end)
        limits = self.limits
        if not 1 <= msg.batch_size <= limits.max_batch_size:
            raise BadRequest(f"batch_size {msg.batch_size} must be in [1, {limits.max_batch_size}]")
        if not 1 <= msg.max_length <= limits.max_seq_length:
            raise BadRequest(f"max_length {msg.max_length} must be in [1, {limits.max_seq_length}] on this peer")
        client_dtype = None
        if msg.dtype:
            if msg.dtype not in FLOAT_DTYPES:
                raise BadRequest(f"dtype {msg.dtype!r} must be one of: {', '.join(FLOAT_DTYPES)}")
            client_dtype = FLOAT_DTYPES[msg.dtype]
        prompts = self._deep_prompts(msg, msg.batch_size)  # their shape: start_inference's check
        return InferenceOpen(
            session_id=msg.session_id,
            batch_size=msg.batch_size,
            max_length=msg.max_length,
            client_dtype=client_dtype,
            response_codec=self._codec(msg.response_codec),
            deep_prompts=None if prompts is None else prompts.to(self._device),
            adapters=self._adapters(msg.adapters),
        )

    def inference_step(self, msg: swarm_pb2.InferenceStep, session: InferenceOpen) -> InferenceStep:
        """Batch, position and max_length against the session: `BlockSpan.inference_step`."""
        if not msg.HasField("hidden_states"):
            raise BadRequest("step hidden_states is missing")
        hidden = self._hidden_states(msg.hidden_states)
        batch, new = hidden.shape[:2]
        if session.client_dtype is not None and hidden.dtype != session.client_dtype:
            raise BadRequest(f"session was opened for dtype {session.client_dtype}, step sends {hidden.dtype}")
        on_span = hidden if hidden.dtype == self._dtype and self._device.type == "cpu" else hidden.to(
            self._device, self._dtype)  # a no-op .to() is a call too: each costs tens of us cold
        return InferenceStep(
            step_id=msg.step_id,
            position=msg.position,
            hidden_states=on_span,
            client_dtype=hidden.dtype,
            attention_mask=self._attention_mask(msg, batch, new),
            position_ids=self._position_ids(msg, batch, new),
            hypo_ids=self._hypo_ids(msg, batch),
        )

    # --- checks ------------------------------------------------------------------------------

    def _check_target(self, model_id: str, start: int, end: int) -> None:
        span = self.span
        if model_id != self.model_id:
            raise NotServed(f"this peer serves model {self.model_id!r}, not {model_id!r}")
        if (start, end) != (span.start, span.end):
            raise NotServed(f"this peer serves blocks [{span.start}, {span.end}) of {self.model_id}; the request "
                            f"asked for [{start}, {end}): send exactly [{span.start}, {span.end})")

    @staticmethod
    def _codec(name: str) -> str:
        name = name or "raw"
        if name not in CODECS:
            raise BadRequest(f"response_codec {name!r} is not one of: {', '.join(CODECS)}")
        return name

    def _floating(self, msg: swarm_pb2.Tensor, name: str, max_elements: int) -> torch.Tensor:
        tensor = deserialize_tensor(msg, max_elements=max_elements, field=name)
        if not tensor.dtype.is_floating_point:
            raise BadRequest(f"{name} must be floating point ({', '.join(FLOAT_DTYPES)}), got {msg.dtype}")
        if not _all_finite(tensor):
            raise BadRequest(f"{name} contains NaN or infinite values")
        return tensor

    def _hidden_states(self, msg: swarm_pb2.Tensor) -> torch.Tensor:
        limits, hidden_size = self.limits, self.hidden_size
        shape = tuple(msg.shape)
        # Shape first, from the message alone: a wrong shape is refused before any bytes are copied.
        if len(shape) != 3 or shape[2] != hidden_size:
            raise BadRequest(f"hidden_states must have shape (batch, seq, {hidden_size}), got {shape}")
        if not 1 <= shape[0] <= limits.max_batch_size:
            raise BadRequest(f"hidden_states batch {shape[0]} must be in [1, {limits.max_batch_size}]")
        if not 1 <= shape[1] <= limits.max_seq_length:
            raise BadRequest(f"hidden_states has {shape[1]} tokens; this peer takes 1 to {limits.max_seq_length}")
        return self._floating(msg, "hidden_states", shape[0] * shape[1] * hidden_size)

    def _attention_mask(self, parent, batch: int, seq: int) -> torch.Tensor | None:
        if not parent.HasField("attention_mask"):
            return None
        mask = deserialize_tensor(parent.attention_mask, max_elements=batch * seq, field="attention_mask")
        if mask.dtype not in MASK_DTYPES:
            raise BadRequest(f"attention_mask must be an integer or bool tensor, got {parent.attention_mask.dtype}")
        return mask  # shape and values: the span's checks

    def _position_ids(self, parent, batch: int, seq: int) -> torch.Tensor | None:
        if not parent.HasField("position_ids"):
            return None
        positions = deserialize_tensor(parent.position_ids, max_elements=batch * seq, field="position_ids")
        if positions.dtype not in INDEX_DTYPES:
            raise BadRequest(f"position_ids must be int64 or int32, got {parent.position_ids.dtype}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= self.limits.max_seq_length):
            raise BadRequest(f"position_ids must be in [0, {self.limits.max_seq_length})")
        return positions.long().to(self._device)  # shape: the span's check

    def _hypo_ids(self, msg: swarm_pb2.InferenceStep, batch: int) -> torch.Tensor | None:
        if not msg.HasField("hypo_ids"):
            return None
        hypo_ids = deserialize_tensor(msg.hypo_ids, max_elements=batch, field="hypo_ids")
        if hypo_ids.dtype != torch.int64:
            raise BadRequest(f"hypo_ids must be int64, got {msg.hypo_ids.dtype}")
        return hypo_ids  # shape and values: the span's check

    def _deep_prompts(self, parent, batch: int) -> torch.Tensor | None:
        if not parent.HasField("deep_prompts"):
            return None
        max_seq_length, shape = self.limits.max_seq_length, tuple(parent.deep_prompts.shape)
        # The prefix length is a limit, checked from the message; the shape is the span's check.
        if len(shape) == 4 and not 1 <= shape[2] <= max_seq_length:
            raise BadRequest(f"deep_prompts prefix (dimension 2 of {shape}) must be in [1, {max_seq_length}]")
        max_elements = self.span.length * batch * max_seq_length * self.hidden_size
        return self._floating(parent.deep_prompts, "deep_prompts", max_elements)

    def _adapters(self, messages) -> list[AdapterSet]:
        if len(messages) > MAX_ADAPTER_SETS:
            raise BadRequest(f"{len(messages)} adapter sets sent; at most {MAX_ADAPTER_SETS} are allowed")
        return [self._adapter_set(msg) for msg in messages]

    def _adapter_set(self, msg: swarm_pb2.AdapterTensors) -> AdapterSet:
        if len(msg.config_json) > MAX_SETTINGS_CHARS:
            raise AdapterError(f"{msg.method} settings are {len(msg.config_json)} characters; at most "
                               f"{MAX_SETTINGS_CHARS} are allowed")
        try:
            method = method_from_json(msg.method, msg.config_json)
        except RecursionError:  # json's C parser recurses per level: '[[[[...' exhausts the stack
            raise AdapterError(f"{msg.method} settings nest too deeply to be settings") from None
        span = self.span
        by_block: dict[int, dict[str, torch.Tensor]] = {block: {} for block in range(span.start, span.end)}
        for name, tensor_msg in msg.tensors.items():
            block_text, dot, local = name.partition(".")
            if not dot or not block_text.isdigit() or str(int(block_text)) != block_text or not local:
                raise AdapterError(f"{method.name} tensor name {name!r} must be '{{block}}.{{tensor}}', "
                                   f"e.g. '{span.start}.self_attn.q_proj.lora_A'")
            block = int(block_text)
            if block not in by_block:
                raise AdapterError(f"{method.name} tensor {name!r} is for block {block}, outside the span "
                                   f"[{span.start}, {span.end})")
            by_block[block][local] = self._floating(tensor_msg, f"{method.name} tensor {name}",
                                                    method.max_elements_per_block)
        tensors = {}
        for block, block_tensors in by_block.items():
            method.check_tensors(span.layers[block - span.start], block, block_tensors)
            tensors.update({f"{block}.{local}": t.to(self._device) for local, t in block_tensors.items()})
        return AdapterSet(method, tensors)


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype in NUMPY_FLOATS and tensor.numel() <= NUMPY_CHECK_ELEMENTS:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())
