"""swarm.wire: codec round trips, error bounds, and rejection of malformed tensor messages."""

from __future__ import annotations

import pytest
import torch

from swarm.wire import (
    CODECS,
    WireError,
    deserialize_tensor,
    get_codec,
    optional_tensor,
    serialize_tensor,
    swarm_pb2,
    swarm_pb2_grpc,
)
from swarm.wire.codecs import BLOCK_SIZE

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALL_CODECS = sorted(CODECS)


def over_the_wire(tensor: torch.Tensor, codec: str, **kwargs) -> torch.Tensor:
    """Serialize, send as bytes, parse and deserialize: what a peer really sees."""
    wire_bytes = serialize_tensor(tensor, codec).SerializeToString()
    return deserialize_tensor(swarm_pb2.Tensor.FromString(wire_bytes), **kwargs)


def activations(shape=(3, 5, 130), dtype=torch.float32, seed=0) -> torch.Tensor:
    # 1950 elements: not a multiple of the int8 block size, so the padded last block is exercised.
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 3).to(dtype)


def assert_int8_error_bounded(decoded: torch.Tensor, original: torch.Tensor) -> None:
    """|error| <= absmax_of_block / 254 (half a quantisation step), plus the output dtype's rounding."""
    x = original.float().reshape(-1)
    err = (decoded.float().reshape(-1) - x).abs()
    pad = (-x.numel()) % BLOCK_SIZE
    absmax = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, BLOCK_SIZE).amax(dim=1)
    bound = (absmax / 254).repeat_interleave(BLOCK_SIZE)[: x.numel()]
    output_rounding = x.abs() * torch.finfo(decoded.dtype).eps
    assert bool((err <= bound * 1.001 + output_rounding + 1e-12).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_float_round_trip(codec: str, dtype: torch.dtype) -> None:
    x = activations(dtype=dtype)
    y = over_the_wire(x, codec)
    assert y.dtype == dtype and y.shape == x.shape
    if codec == "raw":
        assert torch.equal(y, x)
    elif codec in ("float16", "bfloat16"):
        wire_dtype = getattr(torch, codec)
        assert torch.equal(y, x.to(wire_dtype).to(dtype))
        rtol = 2 * max(torch.finfo(wire_dtype).eps, torch.finfo(dtype).eps)
        torch.testing.assert_close(y, x, rtol=rtol, atol=0)
    elif codec == "int8":
        assert_row_int8_error_bounded(y, x)
    else:
        assert_int8_error_bounded(y, x)


def assert_row_int8_error_bounded(decoded: torch.Tensor, original: torch.Tensor, outliers: int = 2) -> None:
    """The row's `outliers` largest magnitudes come back exactly (up to the output dtype); every
    other value is within half a step of the rest of its row's absmax."""
    x = original.float().reshape(-1, original.shape[-1])
    err = (decoded.float().reshape(x.shape) - x).abs()
    magnitude = x.abs().sort(dim=1, descending=True).values
    output_rounding = x.abs() * torch.finfo(decoded.dtype).eps
    top = x.abs() >= magnitude[:, outliers - 1 : outliers]
    assert bool((err[top] <= output_rounding[top]).all())
    bound = magnitude[:, outliers : outliers + 1] / 254
    assert bool((err <= bound * 1.001 + output_rounding + 1e-12).all()), float((err - bound).max())


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_encoded_size(codec: str) -> None:
    x = activations()
    msg = serialize_tensor(x, codec)
    expected = {"raw": 4 * x.numel(), "float16": 2 * x.numel(), "bfloat16": 2 * x.numel(),
                "int8_blockwise": x.numel() + 4 * -(-x.numel() // BLOCK_SIZE),
                "int8": 15 * (4 + 2 * (4 + 2) + 130)}[codec]  # rows of 130: 2 outliers each
    assert len(msg.data) == expected == get_codec(codec).encoded_nbytes(x.shape, x.dtype)
    assert (msg.dtype, list(msg.shape), msg.codec) == ("float32", [3, 5, 130], codec)


def test_int8_keeps_zero_blocks_and_tiny_scales() -> None:
    # float32 scales: gradients around 1e-10 would underflow a float16 scale to zero.
    x = torch.cat([torch.zeros(BLOCK_SIZE), torch.randn(BLOCK_SIZE) * 1e-10, torch.randn(10) * 1e4])
    y = over_the_wire(x, "int8_blockwise")
    assert torch.equal(y[:BLOCK_SIZE], torch.zeros(BLOCK_SIZE))
    assert_int8_error_bounded(y, x)
    assert y[BLOCK_SIZE : 2 * BLOCK_SIZE].abs().max() > 0


def test_int8_relative_error_is_small() -> None:
    x = activations((1, 512, 576))
    y = over_the_wire(x, "int8_blockwise")
    assert ((y - x).norm() / x.norm()).item() < 0.01


def test_row_int8_sends_outliers_exactly() -> None:
    # A hidden state with a few huge features, as real ones have: the bulk keeps its precision.
    x = activations((2, 4, 576))
    x[..., 17] = 495.25
    x[..., 300] = -120.5
    y = over_the_wire(x, "int8")
    assert torch.equal(y[..., [17, 300]], x[..., [17, 300]])
    assert_row_int8_error_bounded(y, x, outliers=8)
    assert ((y - x).norm() / x.norm()).item() < 0.001
    assert len(serialize_tensor(x[:1, :1], "int8").data) == 576 + 4 + 8 * 6


@pytest.mark.parametrize("length, outliers, index_bytes", [(8, 0, 2), (64, 1, 2), (70000, 8, 4)])
def test_row_int8_layout_follows_row_length(length: int, outliers: int, index_bytes: int) -> None:
    x = activations((2, length))
    x[:, length // 3] = 1e4
    y = over_the_wire(x, "int8")
    assert len(serialize_tensor(x, "int8").data) == 2 * (4 + outliers * (4 + index_bytes) + length)
    if outliers:
        assert torch.equal(y[:, length // 3], x[:, length // 3])
        assert_row_int8_error_bounded(y, x, outliers=outliers)
    else:
        assert ((y - x).abs() <= 1e4 / 254 * 1.001).all()


def test_row_int8_refuses_out_of_range_outlier_index() -> None:
    msg = serialize_tensor(activations((1, 1, 576)), "int8")
    data = bytearray(msg.data)
    data[4 + 8 * 4 : 4 + 8 * 4 + 2] = (600).to_bytes(2, "little")  # first index: past the 576-long row
    msg.data = bytes(data)
    with pytest.raises(ValueError, match="outlier index out of range"):
        deserialize_tensor(msg)


def test_float16_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e6, -1e6, 1.0])
    y = over_the_wire(x, "float16")
    assert torch.equal(y, torch.tensor([65504.0, -65504.0, 1.0]))


@pytest.mark.parametrize("codec", ALL_CODECS)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4) * 10**12,
        torch.arange(12, dtype=torch.int32).reshape(2, 6),
        torch.tensor([[True, False, True], [False, False, True]]),
        torch.arange(256, dtype=torch.uint8),
        torch.arange(-128, 128, dtype=torch.int8),
    ],
    ids=lambda t: str(t.dtype),
)
def test_non_floating_tensors_always_go_raw(codec: str, tensor: torch.Tensor) -> None:
    msg = serialize_tensor(tensor, codec)
    assert msg.codec == "raw"
    y = deserialize_tensor(msg)
    assert y.dtype == tensor.dtype and torch.equal(y, tensor)


def test_bool_bytes_other_than_zero_and_one_decode_as_true() -> None:
    msg = swarm_pb2.Tensor(dtype="bool", shape=[4], codec="raw", data=bytes([0, 1, 2, 255]))
    assert deserialize_tensor(msg).tolist() == [False, True, True, True]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("codec", ALL_CODECS)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 576), (1, 0)])
def test_zero_size_tensors(codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.empty(shape, dtype=dtype)
    y = over_the_wire(x, codec)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_scalar_tensor(codec: str) -> None:
    y = over_the_wire(torch.tensor(1.5), codec)
    assert y.shape == () and y.item() == pytest.approx(1.5, rel=1e-2)


@pytest.mark.parametrize("codec", ALL_CODECS)
@pytest.mark.parametrize(
    "make_view",
    [lambda x: x.transpose(0, 2), lambda x: x[:, ::2, 1:-1], lambda x: x[:1].expand(4, -1, -1)],
    ids=["transposed", "strided", "expanded"],
)
def test_non_contiguous_inputs(codec: str, make_view) -> None:
    x = make_view(activations())
    assert not x.is_contiguous()
    y = over_the_wire(x, codec)
    expected = over_the_wire(x.contiguous(), codec)
    assert y.shape == x.shape and torch.equal(y, expected)
    if codec == "raw":
        assert torch.equal(y, x)


def test_tensor_requiring_grad_is_serialized() -> None:
    x = activations().requires_grad_()
    assert torch.equal(over_the_wire(x * 1, "raw"), x.detach())


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_decoded_tensor_is_writable_and_owns_its_memory(codec: str) -> None:
    msg = serialize_tensor(activations(), codec)
    first = deserialize_tensor(msg)
    first.add_(1.0)  # must neither warn nor change what the message decodes to
    assert torch.equal(deserialize_tensor(msg) + 1.0, first)


# --- rejection of malformed messages -----------------------------------------------------


def raw_message(**overrides) -> swarm_pb2.Tensor:
    msg = serialize_tensor(torch.zeros(2, 3, 576))
    for key, value in overrides.items():
        if key == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, key, value)
    return msg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(data=b"\0" * 1000), "tensor data is 1000 bytes but shape (2, 3, 576) float32 raw needs 13824"),
        (dict(codec="int8_blockwise"), "int8_blockwise needs 3672"),
        (dict(codec="zstd"), "codec 'zstd' is not one of: raw, float16, bfloat16, int8_blockwise, int8"),
        (dict(dtype="float64"), "dtype 'float64' is not one of"),
        (dict(dtype=""), "dtype '' is not one of"),
        (dict(shape=[2, -3, -576]), "negative"),
        (dict(shape=[2**31, 2**31]), "needs 18446744073709551616"),
        (dict(shape=[1] * 9), "at most 8"),
        (dict(shape=[0, 2**62, 2**62], data=b""), "too large"),  # empty, but torch cannot stride it
        (dict(dtype="int64", codec="float16"), "codec 'float16' cannot carry dtype int64"),
    ],
)
def test_malformed_messages_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(WireError) as info:
        deserialize_tensor(raw_message(**overrides))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_max_elements() -> None:
    msg = raw_message()
    assert deserialize_tensor(msg, max_elements=2 * 3 * 576).shape == (2, 3, 576)
    with pytest.raises(WireError, match=r"shape \(2, 3, 576\) has 3456 elements; the limit is 3455"):
        deserialize_tensor(msg, max_elements=3455)


def test_error_names_the_field() -> None:
    with pytest.raises(WireError, match="^hidden_states data is 7 bytes"):
        deserialize_tensor(raw_message(data=b"1234567"), field="hidden_states")


def test_empty_codec_means_raw() -> None:
    x = activations()
    msg = serialize_tensor(x)
    msg.codec = ""
    assert torch.equal(deserialize_tensor(msg), x)
    assert serialize_tensor(x, "").codec == "raw"


def test_serialize_rejects_unknown_codec_and_dtype() -> None:
    with pytest.raises(WireError, match="codec 'lz4' is not one of"):
        serialize_tensor(torch.zeros(3), "lz4")
    with pytest.raises(WireError, match="float64 cannot be sent"):
        serialize_tensor(torch.zeros(3, dtype=torch.float64))


def test_get_codec() -> None:
    assert get_codec("int8_blockwise").name == "int8_blockwise"
    with pytest.raises(ValueError, match="valid codecs: bfloat16, float16, int8, int8_blockwise, raw"):
        get_codec("gzip")


def test_lossy_codecs_refuse_integer_tensors_when_used_directly() -> None:
    with pytest.raises(ValueError, match="floating tensors only"):
        get_codec("float16").encode(torch.arange(3))


def test_optional_tensor() -> None:
    step = swarm_pb2.InferenceStep(step_id=1, hidden_states=serialize_tensor(torch.ones(1, 1, 4)))
    assert optional_tensor(step, "hypo_ids") is None
    assert torch.equal(optional_tensor(step, "hidden_states"), torch.ones(1, 1, 4))
    step.attention_mask.SetInParent()  # present but empty: an error, not "absent"
    with pytest.raises(WireError, match="^attention_mask dtype ''"):
        optional_tensor(step, "attention_mask")
    with pytest.raises(WireError, match="limit is 3"):
        optional_tensor(step, "hidden_states", max_elements=3)


def test_generated_grpc_module_imports_as_package() -> None:
    assert swarm_pb2_grpc.__name__ == "swarm.wire.proto.swarm_pb2_grpc"
    assert swarm_pb2_grpc.swarm__pb2 is swarm_pb2
    assert hasattr(swarm_pb2_grpc, "BlockServiceStub") and hasattr(swarm_pb2_grpc, "BlockServiceServicer")
