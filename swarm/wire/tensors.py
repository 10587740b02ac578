"""torch.Tensor <-> `swarmlm.Tensor` messages, with validation of untrusted input.

A peer must reject a bad tensor before it allocates or computes anything, and say what was
wrong, so `deserialize_tensor` checks dtype, codec, shape and the exact byte length first and
raises `WireError` (a ValueError; the service maps it to INVALID_ARGUMENT). Only then does it
copy the payload into a new tensor.

An empty `codec` string means "raw", like the unset `response_codec` of a request (proto3
cannot tell an unset string from an empty one).
"""

from __future__ import annotations

import math

import torch
from google.protobuf.message import Message

from .codecs import CODECS, Codec
from .proto import swarm_pb2

# The dtypes that may cross the wire, by the name used in `Tensor.dtype`.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# Nothing we send has more than 4 dims (deep prompts); this keeps odd shapes out of torch.
MAX_NDIM = 8
# torch computes strides from every size, also the sizes beside a 0, and fails past int64:
# an empty tensor of shape (0, 2**62, 2**62) must be refused here, not crash in torch.
MAX_EXTENT = 2**62


class WireError(ValueError):
    """A tensor message (or a tensor to send) that breaks the wire contract."""


def serialize_tensor(tensor: torch.Tensor, codec: str = "raw") -> swarm_pb2.Tensor:
    """Encode `tensor` with `codec`; integer and bool tensors always go `raw` (the message says so)."""
    dtype_name = DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise WireError(f"tensor dtype {tensor.dtype} cannot be sent; valid dtypes: {', '.join(DTYPES)}")
    chosen = _lookup_codec(codec or "raw", field="tensor")
    if not chosen.supports(tensor.dtype):
        chosen = CODECS["raw"]
    return swarm_pb2.Tensor(
        dtype=dtype_name,
        shape=list(tensor.shape),
        codec=chosen.name,
        data=chosen.encode(tensor),
    )


def deserialize_tensor(
    msg: swarm_pb2.Tensor, *, max_elements: int | None = None, field: str = "tensor"
) -> torch.Tensor:
    """Validate `msg` and decode it into a new writable CPU tensor.

    `max_elements` caps the element count; `field` names the tensor in error messages
    (e.g. "hidden_states").
    """
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{field} dtype {msg.dtype!r} is not one of: {', '.join(DTYPES)}")
    codec = _lookup_codec(msg.codec or "raw", field=field)
    if not codec.supports(dtype):
        raise WireError(
            f"{field} codec {codec.name!r} cannot carry dtype {msg.dtype}; integer and bool tensors are sent 'raw'"
        )

    shape = tuple(msg.shape)
    if len(shape) > MAX_NDIM:
        raise WireError(f"{field} shape {shape} has {len(shape)} dims; at most {MAX_NDIM} are allowed")
    if any(size < 0 for size in shape):
        raise WireError(f"{field} shape {shape} has a negative size")
    if math.prod(max(size, 1) for size in shape) > MAX_EXTENT:
        raise WireError(f"{field} shape {shape} is too large: its sizes (0 counted as 1) multiply to more than 2**62")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise WireError(f"{field} shape {shape} has {numel} elements; the limit is {max_elements}")

    data = msg.data  # upb hands out the same bytes object each time; read it once anyway
    expected = codec.encoded_nbytes(shape, dtype)
    if len(data) != expected:
        raise WireError(
            f"{field} data is {len(data)} bytes but shape {shape} {msg.dtype} {codec.name} needs {expected}"
        )
    return codec.decode(data, shape, dtype)


def optional_tensor(
    parent: Message, field_name: str, *, max_elements: int | None = None
) -> torch.Tensor | None:
    """Decode the optional Tensor field `field_name` of `parent`, or None when it is absent.

    proto3 tracks presence of sub-messages, so an absent field (HasField false) is told apart
    from a present but broken one, which raises WireError like `deserialize_tensor`.
    """
    if not parent.HasField(field_name):
        return None
    return deserialize_tensor(getattr(parent, field_name), max_elements=max_elements, field=field_name)


def _lookup_codec(name: str, *, field: str) -> Codec:
    codec = CODECS.get(name)
    if codec is None:
        raise WireError(f"{field} codec {name!r} is not one of: {', '.join(CODECS)}")
    return codec
