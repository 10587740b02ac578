"""Tensor codecs: how the `data` bytes of a wire `Tensor` encode its values.

The client picks a codec for what it sends and asks for one in the answer
(`response_codec`); activations dominate the traffic, so lossy codecs trade a little
precision for 2x (float16/bfloat16) or ~3.8x (int8_blockwise) fewer bytes than float32.

Codecs:

- ``raw``: the tensor's own bytes in its own dtype, C order, little-endian. Exact.
- ``float16`` / ``bfloat16``: floating values cast to that dtype on the wire and back to the
  declared dtype on decode. float16 saturates at +-65504 (values are clamped, not turned into
  inf, as hivemind does); bfloat16 keeps float32's range with 8 bits of mantissa.
- ``int8_blockwise``: absmax 8-bit quantisation in blocks of 64 values. Layout of `data`::

      scales: float32[n_blocks]   little-endian, n_blocks = ceil(numel / 64)
      values: int8[numel]         round(x / scale), in [-127, 127]

  where block ``b`` holds flat elements ``[64 b, 64 b + 64)`` and ``scale_b = absmax_b / 127``
  (1e-30 / 127 for an all-zero block, whose values are all 0). The last block is zero-padded
  for the arithmetic only; the padding is not sent. Scales are float32, not float16, so gradients far below float16's range
  (~6e-8) survive. Worst-case error per element is ``absmax_b / 254`` (~0.4% of the block's
  absmax). Inputs must be finite.

- ``int8``: one int8 per value with a float32 scale per row (the last dimension: one token's
  hidden state), after setting aside the row's ``k = min(8, row_length // 64)`` largest
  magnitudes, which travel exactly. Transformer hidden states carry a few huge features
  (SmolLM2's last block: 495 where the median is 16), and quantising around them instead of
  with them is what keeps greedy tokens: on the default model, KL to the fp32 next-token
  distribution 3.2e-4 vs 6.2e-3 for int8_blockwise (`benchmarks/wire_codecs.py`). Layout::

      scales:          float32[rows]       absmax of the row without its outliers / 127
      outlier_values:  float32[rows * k]
      outlier_index:   uint16[rows * k]    position in the row (int32 when rows exceed 65536)
      values:          int8[numel]         round(x / scale); 0 where an outlier was taken

  A (1, 1, 576) hidden state is 628 bytes (576 + 52). Duplicate indices are legal (the last
  wins); an index past the row is refused.

Only floating dtypes have a lossy encoding; ``serialize_tensor`` always sends integer and bool
tensors (token ids, masks, hypothesis ids) with ``raw`` whatever codec is asked for, and the
lossy codecs refuse them.

Decoding always returns a fresh, writable CPU tensor that owns its memory: ``torch.frombuffer``
on the message's immutable ``bytes`` would alias memory Python assumes never changes, so the
payload is copied once (a (1, 512, 576) float32 tensor: ~33 us, the same as numpy's copy).
numpy makes that copy where it has the dtype: a decode step's (1, 1, 576) tensor is decoded
by a peer that sat idle while other processes computed, with cold caches, and there numpy's
few calls took ~135 us against ~250 us for torch's frombuffer and reshape.
Callers validate lengths first (``swarm.wire.tensors.deserialize_tensor``); ``decode`` checks
again so a codec used directly fails loudly rather than reading garbage.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

BLOCK_SIZE = 64
_INT8_MAX = 127
# Floor for a block's absmax, so that 127 / absmax stays finite in float32.
_MIN_ABSMAX = 1e-30


class Codec(ABC):
    """One way of turning a tensor into bytes and back."""

    name: str

    @abstractmethod
    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Exact length of the encoding of a `shape` tensor of `dtype`; used to validate untrusted input."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> bytes:
        """Encode `tensor` (any device, any layout); dtype and shape travel beside the bytes."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Decode bytes made by `encode` into a new CPU tensor of `shape` and `dtype`."""

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether this codec may carry tensors of `dtype`."""
        return dtype.is_floating_point

    def _check_length(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> int:
        numel = math.prod(shape)
        expected = self.encoded_nbytes(shape, dtype)
        if len(data) != expected:
            raise ValueError(
                f"{self.name} data is {len(data)} bytes but shape {tuple(shape)} {dtype} needs {expected}"
            )
        return numel

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _to_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # Each call only where needed: with cold caches every torch call costs tens of microseconds.
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a CPU tensor in one copy (protobuf wants `bytes`, so one copy is the floor)."""
    tensor = _to_cpu_contiguous(tensor)
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; same bits as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _tensor_from_bytes(data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A new writable tensor holding a copy of `data` (see the module docstring for why a copy)."""
    if len(data) == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(tuple(shape), dtype=dtype)
    if dtype == torch.bool:
        # Bytes other than 0/1 viewed as bool are undefined behaviour in torch; normalise them.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).ne(0).reshape(tuple(shape))
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is not None:  # the copy is numpy's, and the tensor owns it
        return torch.from_numpy(np.frombuffer(data, dtype=numpy_dtype).reshape(tuple(shape)).copy())
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(shape))


# torch dtypes whose bytes numpy reads the same way (bfloat16 has no numpy dtype).
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                 torch.int32: np.int32, torch.uint8: np.uint8, torch.int8: np.int8}


class RawCodec(Codec):
    """The tensor's own bytes; exact, and the only codec for integer and bool tensors."""

    name = "raw"

    def supports(self, dtype: torch.dtype) -> bool:
        return True

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    def encode(self, tensor: torch.Tensor) -> bytes:
        return _tensor_bytes(tensor)

    def decode(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self._check_length(data, shape, dtype)
        return _tensor_from_bytes(data, shape, dtype)


class CastCodec(Codec):
    """Floating values cast to a 2-byte float dtype on the wire."""

    def __init__(self, name: str, wire_dtype: torch.dtype) -> None:
        self.name = name
        self.wire_dtype = wire_dtype

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return math.prod(shape) * self.wire_dtype.itemsize

    def encode(self, tensor: torch.Tensor) -> bytes:
        _require_floating(self, tensor.dtype)
        tensor = tensor.detach()
        if tensor.dtype != self.wire_dtype:
            wire_max = torch.finfo(self.wire_dtype).max
            if wire_max < torch.finfo(tensor.dtype).max:
                tensor = tensor.clamp(-wire_max, wire_max)
            # Cast on the tensor's own device: on a GPU this halves the device-to-host copy.
            tensor = tensor.to(self.wire_dtype)
        return _tensor_bytes(tensor)

    def decode(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _require_floating(self, dtype)
        self._check_length(data, shape, dtype)
        return _tensor_from_bytes(data, shape, self.wire_dtype).to(dtype)

    def __repr__(self) -> str:
        return f"CastCodec({self.name!r}, {self.wire_dtype})"


class BlockwiseInt8Codec(Codec):
    """Absmax int8 quantisation in blocks of 64, float32 scale per block (layout in the module docstring)."""

    name = "int8_blockwise"

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        numel = math.prod(shape)
        return numel + 4 * _num_blocks(numel)

    def encode(self, tensor: torch.Tensor) -> bytes:
        _require_floating(self, tensor.dtype)
        flat = tensor.detach().reshape(-1).float()
        numel = flat.numel()
        n_blocks = _num_blocks(numel)
        if n_blocks * BLOCK_SIZE != numel:
            flat = torch.nn.functional.pad(flat, (0, n_blocks * BLOCK_SIZE - numel))
        blocks = flat.view(n_blocks, BLOCK_SIZE)
        # An all-zero block gets a tiny scale instead of 0: its values are 0 either way and
        # no division by zero needs a special case. |x| * 127 / absmax <= 127, so no clamp.
        absmax = blocks.abs().amax(dim=1).clamp_min_(_MIN_ABSMAX)
        values = (blocks * (_INT8_MAX / absmax)[:, None]).round_().to(torch.int8)
        return _tensor_bytes(absmax / _INT8_MAX) + _tensor_bytes(values.view(-1)[:numel])

    def decode(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _require_floating(self, dtype)
        numel = self._check_length(data, shape, dtype)
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        n_blocks = _num_blocks(numel)
        buffer = bytearray(data)  # one copy; both views below are consumed into new tensors
        scales = torch.frombuffer(buffer, dtype=torch.float32, count=n_blocks)
        values = torch.frombuffer(buffer, dtype=torch.int8, offset=4 * n_blocks).float()
        if n_blocks * BLOCK_SIZE != numel:
            values = torch.nn.functional.pad(values, (0, n_blocks * BLOCK_SIZE - numel))
        flat = values.view(n_blocks, BLOCK_SIZE).mul_(scales[:, None]).view(-1)[:numel]
        return flat.reshape(tuple(shape)).to(dtype)


class RowInt8Codec(Codec):
    """int8 per row around exactly-sent outliers (layout in the module docstring)."""

    name = "int8"
    max_outliers = 8
    values_per_outlier = 64

    def _layout(self, shape: Sequence[int]) -> tuple[int, int, int, torch.dtype]:
        """(rows, row length, outliers per row, index dtype) for a tensor of `shape`."""
        length = shape[-1] if len(shape) else 1
        rows = math.prod(shape[:-1]) if len(shape) else 1
        outliers = min(self.max_outliers, length // self.values_per_outlier)
        index_dtype = torch.int16 if length <= 1 << 16 else torch.int32  # int16 bits read as uint16
        return rows, length, outliers, index_dtype

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        rows, length, outliers, index_dtype = self._layout(shape)
        if rows * length == 0:
            return 0
        return rows * (4 + outliers * (4 + index_dtype.itemsize) + length)

    def encode(self, tensor: torch.Tensor) -> bytes:
        _require_floating(self, tensor.dtype)
        rows, length, outliers, index_dtype = self._layout(tensor.shape)
        if rows * length == 0:
            return b""
        x = tensor.detach().float().reshape(rows, length)
        if outliers:
            index = x.abs().topk(outliers, dim=1, sorted=False).indices
            outlier_values = x.gather(1, index)
            x = x.scatter(1, index, 0.0)
        absmax = x.abs().amax(dim=1).clamp_min_(_MIN_ABSMAX)
        values = (x * (_INT8_MAX / absmax)[:, None]).round_().to(torch.int8)
        parts = [_tensor_bytes(absmax / _INT8_MAX)]
        if outliers:
            # uint16 positions stored as int16 bits: torch's uint16 lacks CPU kernels for the casts.
            parts += [_tensor_bytes(outlier_values), _tensor_bytes(index.to(torch.int32).to(index_dtype))]
        return b"".join(parts) + _tensor_bytes(values)

    def decode(self, data: bytes | memoryview, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        _require_floating(self, dtype)
        self._check_length(data, shape, dtype)
        rows, length, outliers, index_dtype = self._layout(shape)
        if rows * length == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        buffer = bytearray(data)  # one copy; every view below is consumed into a new tensor
        offset = 4 * rows
        scales = torch.frombuffer(buffer, dtype=torch.float32, count=rows)
        out = torch.frombuffer(buffer, dtype=torch.int8, offset=offset + outliers * rows * (4 + index_dtype.itemsize))
        out = out.float().view(rows, length).mul_(scales[:, None])
        if outliers:
            count = rows * outliers
            outlier_values = torch.frombuffer(buffer, dtype=torch.float32, offset=offset, count=count)
            index = torch.frombuffer(buffer, dtype=index_dtype, offset=offset + 4 * count, count=count).long()
            if index_dtype == torch.int16:
                index &= 0xFFFF
            if bool((index >= length).any()) or bool((index < 0).any()):
                raise ValueError(f"int8 outlier index out of range for rows of {length}")
            out.scatter_(1, index.view(rows, outliers), outlier_values.view(rows, outliers))
        return out.reshape(tuple(shape)).to(dtype)


def _num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def _require_floating(codec: Codec, dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"codec {codec.name!r} encodes floating tensors only, got {dtype}; use 'raw'")


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        RawCodec(),
        CastCodec("float16", torch.float16),
        CastCodec("bfloat16", torch.bfloat16),
        BlockwiseInt8Codec(),
        RowInt8Codec(),
    )
}


def get_codec(name: str) -> Codec:
    """The codec called `name`; ValueError naming the valid ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(sorted(CODECS))}") from None
