"""Fuzzing one real `swarm peer` process with malformed requests of every RPC in protos/swarm.proto.

Every malformed request must be refused with INVALID_ARGUMENT, FAILED_PRECONDITION or
RESOURCE_EXHAUSTED (NOT_FOUND for a Push to a session that is not open) and a message that
says why; UNKNOWN or INTERNAL would mean a check is missing and the request reached code not
written for it. Raw bytes and truncated HTTP/2 frames on the port, and clients that vanish
mid-stream, must not hurt the peer either. Afterwards the same process must be alive, hold
no session, have logged no unexpected error, and answer exactly like the span run here.

Hypothesis runs derandomized with bounded examples, so every CI run sends the same requests.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from swarm.blocks import BlockSpan, SpanInputs
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.loading import load_span
from swarm.wire import CODECS, DTYPES, deserialize_tensor, serialize_tensor, swarm_pb2
from tests.integration.conftest import PeerProcess, SwarmProcs
from tests.peer.rpc_helpers import lora_for, open_request, span_inputs, step_request

pytestmark = pytest.mark.integration

pb = swarm_pb2
Code = grpc.StatusCode
HIDDEN, START, END = 576, 0, 10
MAX_BATCH, MAX_SEQ = 4, 64
REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED})
SERVICE = pb.DESCRIPTOR.services_by_name["BlockService"]
CALL_TIMEOUT = 60.0  # s; a request that hangs ends DEADLINE_EXCEEDED, which is no refusal
LORA_A, LORA_B = "0.self_attn.q_proj.lora_A", "9.self_attn.v_proj.lora_B"

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(repr=False)  # hypothesis prints the fixture with a failing example; keep that short
class Target:
    """The peer under test, a channel to it, and the same span loaded here as the reference."""

    peer: PeerProcess
    channel: grpc.Channel
    span: BlockSpan
    lora: pb.AdapterTensors

    @property
    def model_id(self) -> str:
        return self.peer.model_id

    def __repr__(self) -> str:
        return f"Target({self.peer.endpoint})"

    def unary(self, method: str, request: bytes) -> bytes:
        return self.channel.unary_unary(f"/{SERVICE.full_name}/{method}")(request, timeout=CALL_TIMEOUT)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The peer computes with one thread (--threads 1); so does the reference, so that both
    sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(swarm_procs: SwarmProcs):
    peer = swarm_procs.start_peer("--blocks", f"{START}:{END}", "--max-batch-size", str(MAX_BATCH),
                                  "--max-seq-length", str(MAX_SEQ), "--threads", "1")
    span = load_span(resolve_checkpoint(DEFAULT_MODEL), START, END)  # while the peer starts
    _, lora = lora_for(span, rank=2)
    peer.wait_ready()
    channel = grpc.insecure_channel(peer.endpoint)
    yield Target(peer, channel, span, lora)
    channel.close()


def hidden(batch: int = 1, seq: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def deep_prompts(prefix: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(END - START, 1, prefix, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.1


def refused(error: grpc.RpcError, allowed: frozenset = REFUSALS) -> grpc.StatusCode:
    assert error.code() in allowed, f"{error.code()}: {error.details()}"
    assert error.details(), f"{error.code()} without a message"
    if currently_in_test_context():  # --hypothesis-show-statistics: what the examples reached
        event(f"refused {error.code().name}")
    return error.code()


def outcome(call: Callable, *args, allowed: frozenset = REFUSALS) -> grpc.StatusCode:
    """OK, or a refusal with an allowed code and a message; anything else fails the test."""
    try:
        call(*args)
    except grpc.RpcError as e:
        return refused(e, allowed)
    if currently_in_test_context():
        event("answered")
    return Code.OK


class RawStream:
    """An Inference stream that sends bytes (valid messages or not) and reads parsed answers.
    Leaving `with` drops it abruptly: the channel closes (`close_channel`) or the call is
    cancelled, with no end-of-stream sent."""

    def __init__(self, channel: grpc.Channel, close_channel: bool = False) -> None:
        self._channel, self._close_channel = channel, close_channel
        self._requests: queue.Queue = queue.Queue()
        method = channel.stream_stream(f"/{SERVICE.full_name}/Inference",
                                       response_deserializer=pb.InferenceResponse.FromString)
        self.call = method(iter(self._requests.get, None), timeout=CALL_TIMEOUT)

    def put(self, message) -> None:
        self._requests.put(message if isinstance(message, bytes) else message.SerializeToString())

    def send(self, message) -> pb.InferenceResponse:
        self.put(message)
        return next(self.call)

    def end(self) -> None:
        self._requests.put(None)

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc) -> None:
        if self._close_channel:
            self._channel.close()  # the connection goes, with the stream still open on it
        self.call.cancel()
        self.end()  # lets the request iterator's thread finish


# --- mutations: how a valid message gets broken ---------------------------------------------

@dataclass
class Mutation:
    field: str  # what it changes; a later mutation of the same field would undo it
    what: str
    apply: Callable[[object], None]  # changes the message in place
    must_fail: bool = False

    def __repr__(self) -> str:
        return self.what


@dataclass(frozen=True)
class TensorField:
    """Where a tensor sits in a message, for mutations of any message type."""

    name: str
    get: Callable[[object], pb.Tensor]
    clear: Callable[[object], None]
    floating: bool
    required: bool = False


def _floats(numel: int, seed: int) -> bytes:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


SIZES = st.one_of(st.integers(-3, 12), st.sampled_from([HIDDEN, HIDDEN - 1, 2**31, 2**62, -2**63, 2**63 - 1]))
NAMES = st.one_of(st.sampled_from(list(DTYPES) + list(CODECS) + ["", "float64", "complex64", "raw ", "int4"]),
                  st.text(max_size=12))


@st.composite
def tensor_mutations(draw, field: TensorField) -> Mutation:
    """Wrong dtype, codec, shape (with or without matching bytes), bytes, values, or missing."""
    kind = draw(st.sampled_from(["dtype", "codec", "shape", "reshape", "data", "garbage", "recode", "nonfinite",
                                 "clear"]))
    name, seed = field.name, draw(st.integers(0, 2**16))
    if kind in ("dtype", "codec"):
        value = draw(NAMES)
        return Mutation(name, f"{name}.{kind}={value!r}", lambda m: setattr(field.get(m), kind, value),
                        must_fail=kind == "codec" and value not in CODECS and value != "")
    if kind in ("shape", "reshape"):
        hollow = st.lists(st.sampled_from([2**31, 2**62, 2**63 - 1]), min_size=2, max_size=3).map(lambda s: [0, *s])
        shape = draw(st.lists(SIZES, max_size=10) | hollow)  # hollow: no elements, but sizes past int64

        def set_shape(m) -> None:
            tensor = field.get(m)
            tensor.ClearField("shape")
            tensor.shape.extend(shape)
            numel = math.prod(shape) if min(shape, default=0) >= 0 else -1
            if kind == "reshape" and 0 <= numel <= 1 << 16:  # bytes that fit: only the shape is wrong
                tensor.dtype, tensor.codec, tensor.data = "float32", "raw", _floats(numel, seed)
        return Mutation(name, f"{name}.shape={shape} ({kind})", set_shape)
    if kind == "data":
        cut = draw(st.integers(-64, 64).filter(bool))

        def resize(m) -> None:
            tensor = field.get(m)
            tensor.data = tensor.data[:cut] if cut < 0 else tensor.data + bytes(cut)
        return Mutation(name, f"{name}.data {cut:+d} bytes", resize, must_fail=True)
    if kind in ("garbage", "recode"):
        codec = draw(st.sampled_from(sorted(CODECS)))

        def scramble(m) -> None:
            tensor = field.get(m)
            if kind == "recode" and field.floating:  # e.g. int8_blockwise bytes with garbage scales
                tensor.CopyFrom(serialize_tensor(deserialize_tensor(tensor), codec))
            noise = torch.randint(0, 256, (len(tensor.data),), generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8)
            tensor.data = noise.numpy().tobytes()
        return Mutation(name, f"{name}.data scrambled" + (f" as {codec}" if kind == "recode" else ""), scramble)
    if kind == "nonfinite" and field.floating:
        value, where = draw(st.sampled_from([math.nan, math.inf, -math.inf])), draw(st.integers(0, 2**20))

        def poison(m) -> None:
            tensor = field.get(m)
            values = deserialize_tensor(tensor).reshape(-1)
            values[where % values.numel()] = value
            tensor.CopyFrom(serialize_tensor(values.reshape(tuple(tensor.shape)), tensor.codec))
        return Mutation(name, f"{name} holds {value}", poison, must_fail=True)
    return Mutation(name, f"{name} missing", field.clear, must_fail=field.required)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@st.composite
def adapter_mutations(draw, adapters: Callable[[object], object]) -> Mutation:
    """Unknown methods, bad settings or JSON, stray tensor names, too many sets. `adapters`
    gives the message's repeated AdapterTensors field."""
    kind = draw(st.sampled_from(["method", "settings", "json", "stray", "sets"]))
    if kind == "method":
        name = draw(st.one_of(st.sampled_from(["", "LoRA", "lora ", "ia3", "prefix"]), st.text(max_size=10)))
        return Mutation("adapters", f"adapter method {name!r}", lambda m: setattr(adapters(m)[0], "method", name))
    if kind == "settings":
        changes = draw(st.dictionaries(st.sampled_from(["rank", "alpha", "targets", "dropout", "seed", "r"]), JSON,
                                       min_size=1, max_size=3))

        def resettle(m) -> None:
            adapter = adapters(m)[0]
            adapter.config_json = json.dumps({**json.loads(adapter.config_json), **changes})
        return Mutation("adapters", f"adapter settings {changes}", resettle)
    if kind == "json":
        text = draw(st.one_of(st.text(max_size=30), st.sampled_from(["[" * 5000, '{"rank": ' * 3000, "null", "7"])))
        return Mutation("adapters", f"adapter json {text[:30]!r}",
                        lambda m: setattr(adapters(m)[0], "config_json", text))
    if kind == "stray":
        name = draw(st.one_of(st.text(max_size=30), st.sampled_from(
            ["10.self_attn.q_proj.lora_A", "-1.self_attn.q_proj.lora_A", "00.self_attn.q_proj.lora_A", "0.", ".x",
             "3.self_attn.q_proj.lora_C", "4294967296.mlp.up_proj.lora_A"])))

        def add_stray(m) -> None:
            tensors = adapters(m)[0].tensors
            tensors[name].CopyFrom(tensors[LORA_A])
        return Mutation("adapters", f"adapter tensor {name!r} added", add_stray, must_fail=True)
    count = draw(st.integers(2, 12))

    def repeat(m) -> None:
        for _ in range(count - 1):
            adapters(m).add().CopyFrom(adapters(m)[0])
    return Mutation("adapters", f"{count} adapter sets", repeat)


class _Anything:
    """`valid` for a field where any value may be right."""

    def __contains__(self, item) -> bool:
        return True


def _scalar(name: str, values, set_value: Callable[[object, object], None], valid) -> st.SearchStrategy:
    return values.map(lambda v: Mutation(name, f"{name}={v!r}", lambda m: set_value(m, v), must_fail=v not in valid))


def _lora_field(adapters: Callable[[object], object], tensor: str) -> TensorField:
    return TensorField(f"lora {tensor}", lambda m: adapters(m)[0].tensors[tensor],
                       lambda m: adapters(m)[0].tensors.__delitem__(tensor), floating=True, required=True)


def _optional(parent: Callable[[object], object], name: str, floating: bool, required: bool = False) -> TensorField:
    return TensorField(name, lambda m: getattr(parent(m), name), lambda m: parent(m).ClearField(name),
                       floating, required)


def target_mutations(prefix: str, parent: Callable[[object], object], start_end_valid=(START, END)):
    """model_id, start and end of a SpanInputs or InferenceOpen."""
    def set_field(field):
        return lambda m, v: setattr(parent(m), field, v)
    return [
        _scalar(f"{prefix}model_id", st.text(max_size=20), set_field("model_id"), valid=()),
        _scalar(f"{prefix}start", st.integers(0, 2**32 - 1), set_field("start"), valid=(start_end_valid[0],)),
        _scalar(f"{prefix}end", st.integers(0, 2**32 - 1), set_field("end"), valid=(start_end_valid[1],)),
        _scalar(f"{prefix}response_codec", NAMES, set_field("response_codec"), valid=(*CODECS, "")),
    ]


def span_call_mutations(backward: bool) -> st.SearchStrategy:
    """Mutations of a BackwardRequest whose `inputs` carry every optional field."""
    inputs = lambda m: m.inputs  # noqa: E731
    adapters = lambda m: m.inputs.adapters  # noqa: E731
    fields = [_optional(inputs, "hidden_states", True, required=True), _optional(inputs, "attention_mask", False),
              _optional(inputs, "position_ids", False), _optional(inputs, "deep_prompts", True),
              _lora_field(adapters, LORA_A), _lora_field(adapters, LORA_B)]
    if backward:
        fields.append(_optional(lambda m: m, "grad_outputs", True, required=True))
    # Nested, so that each group is drawn as often, however many fields it has.
    return st.one_of(st.one_of(*[tensor_mutations(f) for f in fields]), adapter_mutations(adapters),
                     st.one_of(*target_mutations("", inputs)))


def base_backward(t: Target) -> pb.BackwardRequest:
    """A valid request with every optional field present, so each can be broken."""
    inputs = span_inputs(t.model_id, START, END, hidden(), attention_mask=torch.tensor([[0, 1, 1]]),
                         position_ids=torch.tensor([[0, 0, 1]]), deep_prompts=deep_prompts(),
                         adapters=[t.lora])
    return pb.BackwardRequest(inputs=inputs, grad_outputs=serialize_tensor(hidden(seed=1)))


# --- Forward and Backward --------------------------------------------------------------------

@FUZZ
@given(data=st.data(), backward=st.booleans())
def test_forward_and_backward_refuse_malformed_inputs(target, data, backward):
    request = base_backward(target)
    mutations = data.draw(st.lists(span_call_mutations(backward), min_size=1, max_size=2,
                                   unique_by=lambda m: m.field), label="mutations")
    for mutation in mutations:
        mutation.apply(request)
    if backward:
        code = outcome(target.unary, "Backward", request.SerializeToString())
    else:
        code = outcome(target.unary, "Forward", pb.ForwardRequest(inputs=request.inputs).SerializeToString())
    if any(m.must_fail for m in mutations):
        assert code != Code.OK, f"accepted: {mutations}"


def _set_lora_settings(**changes):
    def apply(request: pb.BackwardRequest) -> None:
        adapter = request.inputs.adapters[0]
        adapter.config_json = json.dumps({**json.loads(adapter.config_json), **changes})
    return apply


def _set_shape(get: Callable, shape: list[int]):
    def apply(request: pb.BackwardRequest) -> None:
        tensor = get(request)
        tensor.ClearField("shape")
        tensor.shape.extend(shape)
        tensor.data = b""
    return apply


HOLLOW = [0, 2**62, 2**62]  # no elements, but torch cannot compute its strides


@pytest.mark.parametrize("rpc", ["Forward", "Backward"])
@pytest.mark.parametrize("break_it, says", [
    (_set_lora_settings(rank="abc"), "rank must be a finite number"),
    (_set_lora_settings(rank=float("inf")), "rank must be a finite number"),
    (_set_lora_settings(alpha=float("nan")), "alpha must be a finite number"),
    (_set_lora_settings(targets=[1]), "targets must be module names"),
    (_set_lora_settings(dropout=0.5, seed="x"), "seed must be None or an integer"),
    (_set_lora_settings(dropout=0.5, seed=2**70), "seed must be None or an integer"),
    (lambda r: setattr(r.inputs.adapters[0], "config_json", "[" * 100_000), "settings"),
    (_set_shape(lambda r: r.inputs.adapters[0].tensors[LORA_A], HOLLOW), "too large"),
    (_set_shape(lambda r: r.inputs.attention_mask, HOLLOW), "attention_mask"),
    (_set_shape(lambda r: r.inputs.position_ids, HOLLOW), "position_ids"),
    (_set_shape(lambda r: r.inputs.hidden_states, [1, 2**62, HIDDEN]), "hidden_states"),
    (_set_shape(lambda r: r.inputs.deep_prompts, [END - START, 1, 2**40, HIDDEN]), "deep_prompts"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_requests_that_once_crashed_the_peer_are_invalid_argument(target, rpc, break_it, says):
    """Found by the fuzz tests above with more examples (each answered INTERNAL before a fix)."""
    request = base_backward(target)
    break_it(request)
    message = request if rpc == "Backward" else pb.ForwardRequest(inputs=request.inputs)
    with pytest.raises(grpc.RpcError) as error:
        target.unary(rpc, message.SerializeToString())
    assert error.value.code() == Code.INVALID_ARGUMENT and says in error.value.details(), error.value.details()


def test_hollow_grad_outputs_are_invalid_argument(target):
    request = base_backward(target)
    request.grad_outputs.CopyFrom(pb.Tensor(dtype="float32", shape=HOLLOW))
    with pytest.raises(grpc.RpcError) as error:
        target.unary("Backward", request.SerializeToString())
    assert error.value.code() == Code.INVALID_ARGUMENT and "grad_outputs" in error.value.details()


# --- every RPC: bytes that are not its message ----------------------------------------------

@FUZZ
@given(method=st.sampled_from([m.name for m in SERVICE.methods]), payload=st.binary(max_size=256))
def test_every_rpc_refuses_bytes_that_are_not_its_message(target, method, payload):
    allowed = REFUSALS | {Code.NOT_FOUND} if method == "Push" else REFUSALS
    if SERVICE.methods_by_name[method].client_streaming:
        # An Inference stream of one message that is not a valid `open` for this peer, then its
        # end: it must be refused. Bytes that parse are an empty message, a `step`, or an `open`
        # naming another model or span (random bytes never spell this peer's model_id), and all
        # of those are refused; ending cleanly (OK) would mean the peer accepted them.
        with RawStream(target.channel) as stream, pytest.raises(grpc.RpcError) as error:
            stream.put(payload)
            stream.end()
            list(stream.call)
        refused(error.value, allowed)
    else:
        outcome(target.unary, method, payload, allowed=allowed)


@pytest.mark.parametrize("method, payload, says", [
    ("Forward", b"\x0a\x03\x0a\x01\xff", "not a valid swarmlm.ForwardRequest"),  # model_id not UTF-8
    ("Backward", b"\xff\xff\xff\xff", "not a valid swarmlm.BackwardRequest"),
    ("Info", b"\x08", "not a valid swarmlm.InfoRequest"),  # a truncated varint
    ("Inference", b"\x0a\x05\x12\x01", "not a valid swarmlm.InferenceRequest"),  # declares 5 bytes, has 2
])
def test_unparsable_requests_are_invalid_argument(target, method, payload, says):
    if method == "Inference":
        with RawStream(target.channel) as stream, pytest.raises(grpc.RpcError) as error:
            stream.send(payload)
        error = error.value
    else:
        with pytest.raises(grpc.RpcError) as error:
            target.unary(method, payload)
        error = error.value
    assert error.code() == Code.INVALID_ARGUMENT and says in error.details(), error.details()


# --- inference sessions ----------------------------------------------------------------------

def open_mutations() -> st.SearchStrategy:
    opened = lambda m: m.open  # noqa: E731
    adapters = lambda m: m.open.adapters  # noqa: E731

    def set_open(field):
        return lambda m, v: setattr(m.open, field, v)
    return st.one_of(
        st.one_of(tensor_mutations(_optional(opened, "deep_prompts", True)),
                  tensor_mutations(_lora_field(adapters, LORA_A))),
        adapter_mutations(adapters), st.one_of(*target_mutations("open.", opened)),
        _scalar("batch_size", st.integers(0, 2**32 - 1), set_open("batch_size"), valid=range(1, MAX_BATCH + 1)),
        _scalar("max_length", st.integers(0, 2**32 - 1), set_open("max_length"), valid=range(1, MAX_SEQ + 1)),
        _scalar("dtype", NAMES, set_open("dtype"), valid=("", "float32", "float16", "bfloat16")),
        _scalar("session_id", st.text(max_size=300), set_open("session_id"), valid=_Anything()),
    )


def step_mutations() -> st.SearchStrategy:
    step = lambda m: m.step  # noqa: E731
    fields = [_optional(step, "hidden_states", True, required=True), _optional(step, "attention_mask", False),
              _optional(step, "position_ids", False), _optional(step, "hypo_ids", False)]
    return st.one_of(*[tensor_mutations(f) for f in fields],
                     _scalar("position", st.integers(0, 2**32 - 1), lambda m, v: setattr(m.step, "position", v),
                             valid=_Anything()))


def session_open(t: Target, batch: int, seed: int) -> pb.InferenceRequest:
    """A valid open with every optional field, so each can be broken."""
    return open_request(t.model_id, START, END, batch_size=batch, max_length=16, session_id=f"fuzz-{seed}",
                        deep_prompts=deep_prompts(), adapters=[t.lora])


@FUZZ
@given(mutation=open_mutations(), batch=st.integers(1, 2), seed=st.integers(0, 1000))
def test_inference_open_refuses_malformed_sessions(target, mutation, batch, seed):
    request = session_open(target, batch, seed)
    mutation.apply(request)
    with RawStream(target.channel) as stream:
        try:
            stream.send(request)
            assert not mutation.must_fail, f"accepted: {mutation}"
            stream.send(step_request(1, 0, hidden(batch, 2, seed)))  # a session that opened works
            event("step answered")
        except grpc.RpcError as e:
            refused(e)


# After a valid 'open': steps (maybe broken), messages out of order, or garbage.
ACTIONS = st.one_of(
    st.tuples(st.just("step"), st.integers(1, 4), st.integers(-3, 0), st.none()),
    st.tuples(st.just("step"), st.integers(1, 4), st.integers(-3, 0), step_mutations()),
    st.tuples(st.sampled_from(["open again", "empty message"])),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=64)),
)
# How the client leaves: politely, or gone without a word (maybe while its step computes).
ENDINGS = st.sampled_from(["close", "cancel", "cancel mid-step", "drop the connection"])


@FUZZ
@given(batch=st.integers(1, 2), actions=st.lists(ACTIONS, min_size=1, max_size=4), ending=ENDINGS,
       seed=st.integers(0, 1000))
def test_inference_steps_refuse_malformed_and_out_of_order_messages(target, batch, actions, ending, seed):
    dropped = ending == "drop the connection"
    channel = grpc.insecure_channel(target.peer.endpoint) if dropped else target.channel
    request = session_open(target, batch, seed)
    with RawStream(channel, close_channel=dropped) as stream:
        try:
            held, step_id = stream.send(request).position, 0
            for action in actions:
                if action[0] == "step":
                    _, tokens, back, mutation = action
                    step_id += 1
                    message = step_request(step_id, max(0, held + back), hidden(batch, tokens, seed + step_id))
                    if mutation is not None:
                        mutation.apply(message)
                    held = stream.send(message).position
                    assert mutation is None or not mutation.must_fail, f"accepted: {mutation}"
                    event("step answered")
                else:
                    message = {"open again": request, "empty message": pb.InferenceRequest()}.get(action[0])
                    stream.send(action[1] if action[0] == "garbage" else message)
                    raise AssertionError(f"accepted {action[0]} after open")
            if ending == "close":
                stream.end()
                assert list(stream.call) == []
            elif ending == "cancel mid-step":  # the peer is likely computing it when the client goes
                stream.put(step_request(step_id + 1, 0, hidden(batch, 16, seed)))
                time.sleep(0.005)
        except grpc.RpcError as e:
            refused(e)


def test_a_session_keeps_working_after_refused_sessions_around_it(target):
    """Not only the peer but each other session survives its neighbours' refusals."""
    state = target.span.start_inference(1, 8)
    tokens = [hidden(1, 2, seed=70), hidden(1, 1, seed=71)]
    expected = [target.span.inference_step(state, x) for x in tokens]
    with RawStream(target.channel) as good:
        good.send(open_request(target.model_id, START, END, max_length=8, session_id="good"))
        answers = [good.send(step_request(1, 0, tokens[0]))]
        for bad in (step_request(1, 0, hidden(3, 1)), pb.InferenceRequest(), b"\xff"):
            with RawStream(target.channel) as other, pytest.raises(grpc.RpcError) as error:
                other.send(open_request(target.model_id, START, END, max_length=8, session_id="bad"))
                other.send(bad)
            refused(error.value)
        answers.append(good.send(step_request(2, 2, tokens[1])))
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)


# --- Push: steps sent peer to peer -----------------------------------------------------------

@FUZZ
@given(session_id=st.text(max_size=40), mutation=st.none() | step_mutations(), to_open=st.booleans())
def test_push_refuses_unknown_sessions_and_malformed_steps(target, session_id, mutation, to_open):
    if "Push" not in SERVICE.methods_by_name:
        pytest.skip("this protocol has no Push")
    step = step_request(1, 0, hidden(1, 2))
    if mutation is not None:
        mutation.apply(step)
    with RawStream(target.channel) as stream:
        if to_open:
            session_id = f"push-{session_id}"
            stream.send(open_request(target.model_id, START, END, max_length=8, session_id=session_id))
        push = pb.PushRequest(session_id=session_id, step=step.step)
        code = outcome(target.unary, "Push", push.SerializeToString(), allowed=REFUSALS | {Code.NOT_FOUND})
        if not to_open:
            assert code == Code.NOT_FOUND
        elif code == Code.OK:  # queued: the session runs it, or refuses it on the client's stream
            try:
                answer = next(stream.call)
                assert mutation is None or not mutation.must_fail, f"accepted: {mutation}"
                assert answer.step_id == 1
            except grpc.RpcError as e:
                refused(e)


# --- the port itself: raw bytes and broken HTTP/2 -------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream_id: int, payload: bytes, declared: int | None = None) -> bytes:
    """An HTTP/2 frame; `declared` lies about the payload's length."""
    length = len(payload) if declared is None else declared
    return length.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_call_frames(method: str, message: bytes, declared_message: int | None = None) -> list[bytes]:
    headers = b"".join(hpack_literal(n, v) for n, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", f"/{SERVICE.full_name}/{method}".encode()),
        (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    prefix = b"\x00" + (len(message) if declared_message is None else declared_message).to_bytes(4, "big")
    return [frame(0x4, 0, 0, b""),  # SETTINGS
            frame(0x1, 0x4, 1, headers),  # HEADERS, END_HEADERS
            frame(0x0, 0x1, 1, prefix + message)]  # DATA, END_STREAM


def send_raw(port: int, payload: bytes, linger: float = 0.2) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(linger)
        try:
            while sock.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass


HTTP2_FRAMES = st.tuples(st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 2**31 - 1]),
                         st.binary(max_size=64), st.none() | st.integers(0, 2**24 - 1))


@FUZZ
@given(prefix=st.sampled_from([b"", PREFACE, PREFACE[:10]]), noise=st.binary(max_size=512),
       frames=st.lists(HTTP2_FRAMES, max_size=4), cut=st.integers(0, 4096))
def test_random_bytes_and_truncated_http2_frames_on_the_port(target, prefix, noise, frames, cut):
    payload = prefix + b"".join(frame(*f) for f in frames) + noise
    send_raw(target.peer.port, payload[: max(1, len(payload) - cut)] if cut < len(payload) else payload)
    assert target.peer.proc.poll() is None, target.peer.output()


@pytest.mark.parametrize("case", ["huge declared message", "truncated message", "truncated frame",
                                  "headers without end", "garbage hpack", "data on a closed stream"])
def test_broken_grpc_calls_over_raw_http2(target, case):
    message = pb.InfoRequest().SerializeToString()
    forward = pb.ForwardRequest(inputs=span_inputs(target.model_id, START, END, hidden())).SerializeToString()
    frames = {
        "huge declared message": grpc_call_frames("Forward", forward[:100], declared_message=2**32 - 1),
        "truncated message": grpc_call_frames("Forward", forward[:1000], declared_message=len(forward)),
        "truncated frame": [f[:-7] if i == 2 else f for i, f in enumerate(grpc_call_frames("Forward", forward))],
        "headers without end": [frame(0x1, 0x0, 1, grpc_call_frames("Info", message)[1][9:])],
        "garbage hpack": [frame(0x1, 0x5, 1, b"\xff" * 40)],
        "data on a closed stream": grpc_call_frames("Info", message) + [frame(0x0, 0x1, 1, b"\x00" * 5)],
    }[case]
    send_raw(target.peer.port, PREFACE + b"".join(frames), linger=0.5)
    assert target.peer.proc.poll() is None, target.peer.output()
    assert target.peer.stub().Info(pb.InfoRequest(), timeout=10).end == END


# --- afterwards ------------------------------------------------------------------------------

def test_the_peer_survived_freed_everything_and_still_matches_local(target):
    peer, span = target.peer, target.span
    assert peer.proc.poll() is None, peer.output()
    log = peer.output()
    for sign in ("failed unexpectedly", "Traceback", "was never retrieved", "Exception in callback"):
        assert sign not in log, log
    stub = peer.stub()
    deadline = time.monotonic() + 10  # abandoned streams end as the peer notices the cancellations
    while (info := stub.Info(pb.InfoRequest(), timeout=10)).active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (info.active_sessions, info.cache_tokens_free) == (0, info.cache_tokens_total), info

    x, mask, grad = hidden(2, 5, seed=80), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), hidden(2, 5, seed=81)
    forward = stub.Forward(pb.ForwardRequest(inputs=span_inputs(peer.model_id, START, END, x, attention_mask=mask)),
                           timeout=30)
    with torch.no_grad():
        torch.testing.assert_close(deserialize_tensor(forward.hidden_states), span.forward(SpanInputs(x, mask)),
                                   atol=1e-5, rtol=0)
    backward = stub.Backward(pb.BackwardRequest(inputs=span_inputs(peer.model_id, START, END, x),
                                                grad_outputs=serialize_tensor(grad)), timeout=30)
    torch.testing.assert_close(deserialize_tensor(backward.grad_hidden_states),
                               span.backward(SpanInputs(x), grad).hidden_states,
                               atol=1e-5, rtol=0)
    state = span.start_inference(1, 8)
    tokens = [hidden(1, 4, seed=82), hidden(1, 1, seed=83)]
    with RawStream(target.channel) as stream:
        stream.send(open_request(peer.model_id, START, END, max_length=8))
        for i, x in enumerate(tokens):
            answer = stream.send(step_request(i + 1, state.position, x))
            torch.testing.assert_close(deserialize_tensor(answer.hidden_states), span.inference_step(state, x),
                                       atol=1e-5, rtol=0)
        stream.end()
        assert list(stream.call) == []
