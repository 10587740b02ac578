"""peer.service.BlockService on a real 2-block span, served in this process over real gRPC.

What a real peer process adds (DHT, CLI, signals) is tested in
tests/integration/test_peer_service.py; here go the cases that need many requests or a
short timeout: adapters and deep prompts, codecs and dtypes, every validation rule, the
idle timeout and shutdown of open sessions.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from peer.config import PeerLimits
from peer.memory import CacheBudget
from peer.service import BlockService, ServedModel
from swarm.blocks import SpanInputs
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.tuning import AdapterSet
from swarm.tuning.prefix import PrefixTuning
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2, swarm_pb2_grpc
from tests.peer.rpc_helpers import (
    BackgroundServer,
    SessionStream,
    lora_for,
    open_request,
    rpc_error,
    span_inputs,
    step_request,
)

pb = swarm_pb2
MODEL_ID = "smollm2-135m-instruct-testtest"
START, END = 3, 5
HIDDEN = 576
Code = grpc.StatusCode


class InProcessPeer(BackgroundServer):
    """BlockService on a grpc.aio server whose event loop runs on a background thread."""

    def __init__(self, span, *, cache_tokens: int = 4096, session_timeout: float = 30.0,
                 limits: PeerLimits = PeerLimits(max_batch_size=4, max_seq_length=128)) -> None:
        super().__init__()
        self.budget = CacheBudget(cache_tokens)
        served = ServedModel(model_id=MODEL_ID, model_name="smollm2-135m-instruct", num_blocks=30, throughput=1.0)
        self.service = BlockService(span, served, self.runtime, self.budget, limits, session_timeout)
        self.start(lambda server: swarm_pb2_grpc.add_BlockServiceServicer_to_server(self.service, server))


@pytest.fixture(scope="module")
def span():
    return load_span(resolve_checkpoint("smollm2-135m-instruct"), START, END)


@pytest.fixture(scope="module")
def peer(span):
    peer = InProcessPeer(span)
    yield peer
    peer.close()


def hidden(batch=2, seq=5, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def deep_prompts(batch=2, prefix=3, seed=1) -> torch.Tensor:
    return torch.randn(END - START, batch, prefix, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.1


def forward(peer, inputs) -> torch.Tensor:
    return deserialize_tensor(peer.stub.Forward(pb.ForwardRequest(inputs=inputs), timeout=30).hidden_states)


def info(peer) -> pb.PeerInfo:
    return peer.stub.Info(pb.InfoRequest(), timeout=10)


# --- equivalence ----------------------------------------------------------------------------


def test_forward_with_lora_and_deep_prompts_equals_local(peer, span):
    x, prompts = hidden(), deep_prompts()
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    lora, lora_msg = lora_for(span)
    with torch.no_grad():
        expected = span.forward(SpanInputs(x, mask, deep_prompts=prompts, adapters=[lora]))
    got = forward(peer, span_inputs(MODEL_ID, START, END, x, attention_mask=mask, deep_prompts=prompts,
                                    adapters=[lora_msg]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, span.forward(SpanInputs(x, mask))), "the adapter and prompts must change the output"


def test_backward_with_lora_and_deep_prompts_equals_local(peer, span):
    x, prompts, grad = hidden(seed=2), deep_prompts(seed=3), hidden(seed=4)
    lora, lora_msg = lora_for(span, seed=5)
    expected = span.backward(SpanInputs(x, deep_prompts=prompts, adapters=[lora]), grad)
    inputs = span_inputs(MODEL_ID, START, END, x, deep_prompts=prompts, adapters=[lora_msg])
    answer = peer.stub.Backward(pb.BackwardRequest(inputs=inputs, grad_outputs=serialize_tensor(grad)), timeout=30)
    torch.testing.assert_close(deserialize_tensor(answer.grad_hidden_states), expected.hidden_states, atol=1e-5, rtol=0)
    torch.testing.assert_close(deserialize_tensor(answer.grad_deep_prompts), expected.deep_prompts, atol=1e-5, rtol=0)
    [grad_lora] = answer.grad_adapters
    assert (grad_lora.method, grad_lora.config_json) == (lora_msg.method, lora_msg.config_json)
    assert set(grad_lora.tensors) == set(lora_msg.tensors)
    for name, tensor in grad_lora.tensors.items():
        torch.testing.assert_close(deserialize_tensor(tensor), expected.adapters[0][name], atol=1e-5, rtol=0)


def backward_answer(peer, inputs, grad, backward_id: str = "") -> dict[str, torch.Tensor]:
    answer = peer.stub.Backward(pb.BackwardRequest(inputs=inputs, grad_outputs=serialize_tensor(grad),
                                                   backward_id=backward_id), timeout=30)
    grads = {"hidden_states": deserialize_tensor(answer.grad_hidden_states),
             "deep_prompts": deserialize_tensor(answer.grad_deep_prompts)}
    grads.update({name: deserialize_tensor(t) for name, t in answer.grad_adapters[0].tensors.items()})
    return grads


def test_backward_from_a_kept_forward_graph_equals_recomputation(peer, span):
    """Forward naming a backward_id keeps its graph; the Backward naming it uses the graph (the
    peer's counters say so) and gives the recomputed gradients. The graph is used once; a second
    Backward with the same id, or one whose inputs differ from the Forward's, recomputes."""
    x, prompts, grad = hidden(seed=12), deep_prompts(seed=13), hidden(seed=14)
    lora, lora_msg = lora_for(span, seed=15)
    inputs = span_inputs(MODEL_ID, START, END, x, deep_prompts=prompts, adapters=[lora_msg])
    expected = backward_answer(peer, inputs, grad)
    before = info(peer)

    out = peer.stub.Forward(pb.ForwardRequest(inputs=inputs, backward_id="step-1"), timeout=30).hidden_states
    with torch.no_grad():
        local = span.forward(SpanInputs(x, deep_prompts=prompts, adapters=[lora]))
        torch.testing.assert_close(deserialize_tensor(out), local, atol=1e-5, rtol=0)
    held = info(peer).kept_graph_bytes - before.kept_graph_bytes
    assert held > 100_000, "2 x 5 tokens x 10 blocks of activations"
    kept = backward_answer(peer, inputs, grad, "step-1")
    after = info(peer)
    assert (after.backwards_kept - before.backwards_kept, after.backwards_recomputed - before.backwards_recomputed,
            after.kept_graph_bytes) == (1, 0, before.kept_graph_bytes)
    assert kept.keys() == expected.keys()
    for name in kept:
        torch.testing.assert_close(kept[name], expected[name], atol=1e-5, rtol=0)

    again = backward_answer(peer, inputs, grad, "step-1")  # spent: recomputed, same answer
    peer.stub.Forward(pb.ForwardRequest(inputs=inputs, backward_id="step-2"), timeout=30)
    other_inputs = span_inputs(MODEL_ID, START, END, hidden(seed=16), deep_prompts=prompts, adapters=[lora_msg])
    other = backward_answer(peer, other_inputs, grad, "step-2")
    last = info(peer)
    assert (last.backwards_kept, last.backwards_recomputed) == (after.backwards_kept, after.backwards_recomputed + 2)
    torch.testing.assert_close(again["hidden_states"], expected["hidden_states"], atol=1e-5, rtol=0)
    torch.testing.assert_close(other["hidden_states"], backward_answer(peer, other_inputs, grad)["hidden_states"],
                               atol=1e-5, rtol=0)


def test_activations_come_back_in_the_clients_dtype_and_codec(peer, span):
    x = hidden(dtype=torch.bfloat16)
    with torch.no_grad():
        expected = span.forward(SpanInputs(x.float()))
    answer = peer.stub.Forward(pb.ForwardRequest(inputs=span_inputs(
        MODEL_ID, START, END, x, codec="bfloat16", response_codec="int8_blockwise")), timeout=30)
    assert (answer.hidden_states.dtype, answer.hidden_states.codec) == ("bfloat16", "int8_blockwise")
    got = deserialize_tensor(answer.hidden_states)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_inference_with_rollback_and_beam_reorder_equals_local(peer, span):
    tokens = [hidden(seq=4, seed=10), hidden(seq=1, seed=11), hidden(seq=1, seed=12), hidden(seq=1, seed=13)]
    reorder = torch.tensor([1, 1])
    state = span.start_inference(2, 16)
    expected = [span.inference_step(state, tokens[0]), span.inference_step(state, tokens[1])]
    expected.append(span.inference_step(state, tokens[2], hypo_ids=reorder))
    expected.append(span.inference_step(state, tokens[3], position=5))  # replaces the last token

    with SessionStream(peer.stub) as stream:
        opened = stream.send(open_request(MODEL_ID, START, END, batch_size=2, max_length=16))
        assert (opened.step_id, opened.position, opened.HasField("hidden_states")) == (0, 0, False)
        answers = [stream.send(step_request(1, 0, tokens[0])), stream.send(step_request(2, 4, tokens[1])),
                   stream.send(step_request(3, 5, tokens[2], hypo_ids=reorder)),
                   stream.send(step_request(4, 5, tokens[3]))]
        assert info(peer).active_sessions == 1
    assert [(a.step_id, a.position) for a in answers] == [(1, 4), (2, 5), (3, 6), (4, 6)]
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)


def test_inference_with_lora_and_deep_prompts_equals_local(peer, span):
    prompts = deep_prompts(batch=1, prefix=2, seed=20)
    lora, lora_msg = lora_for(span, seed=21)
    tokens = [hidden(batch=1, seq=3, seed=22), hidden(batch=1, seq=1, seed=23)]
    state = span.start_inference(1, 8, prompts, [lora])
    expected = [span.inference_step(state, x) for x in tokens]
    with SessionStream(peer.stub) as stream:
        stream.send(open_request(MODEL_ID, START, END, max_length=8, deep_prompts=prompts, adapters=[lora_msg]))
        answers = [stream.send(step_request(1, 0, tokens[0])), stream.send(step_request(2, 3, tokens[1]))]
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)


def test_concurrent_clients_do_not_see_each_others_adapters(peer, span):
    """Training calls with LoRA run while a plain session generates: one compute thread, so
    the LoRA hooks of one request never touch another's compute."""
    _, lora_msg = lora_for(span, seed=30)
    tokens = [hidden(batch=1, seq=1, seed=40 + i) for i in range(12)]
    state = span.start_inference(1, 16)
    expected = [span.inference_step(state, x) for x in tokens]
    errors: list[BaseException] = []

    def train() -> None:
        try:
            for _ in range(4):
                forward(peer, span_inputs(MODEL_ID, START, END, hidden(batch=4, seq=16), adapters=[lora_msg]))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    trainers = [threading.Thread(target=train) for _ in range(2)]
    for thread in trainers:
        thread.start()
    with SessionStream(peer.stub) as stream:
        stream.send(open_request(MODEL_ID, START, END, max_length=16))
        answers = [stream.send(step_request(i + 1, i, x)) for i, x in enumerate(tokens)]
    for thread in trainers:
        thread.join(60)
    assert not errors, errors
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)


def test_concurrent_sessions_decode_steps_run_together_as_alone(peer, span):
    """Four sessions (different lengths, one a batch of 2, one with a prefix) send decode steps
    while the compute thread is busy: they run as one forward pass, each getting what it
    gets alone; a LoRA session's step runs apart."""
    from peer.runtime import Priority

    prefix = PrefixTuning(num_virtual_tokens=2)
    generator = torch.Generator().manual_seed(50)
    prefix_set = AdapterSet(prefix, {f"{START + i}.{name}": torch.randn(shape, generator=generator) * 0.3
                                     for i, layer in enumerate(span.layers)
                                     for name, shape in prefix.tensor_shapes(layer).items()})
    prefix_msg = pb.AdapterTensors(method="prefix", config_json=prefix.to_json(),
                                   tensors={n: serialize_tensor(t) for n, t in prefix_set.tensors.items()})
    lora, lora_msg = lora_for(span, seed=51)
    plans = [dict(batch=1, prompt=3), dict(batch=1, prompt=7), dict(batch=2, prompt=5),
             dict(batch=1, prompt=4, adapters=[prefix_set], msgs=[prefix_msg]),
             dict(batch=1, prompt=6, adapters=[lora], msgs=[lora_msg])]
    prompts = [hidden(batch=p["batch"], seq=p["prompt"], seed=60 + i) for i, p in enumerate(plans)]
    steps = [[hidden(batch=p["batch"], seq=1, seed=70 + 10 * i + k) for k in range(3)] for i, p in enumerate(plans)]
    expected = []
    for plan, prompt, mine in zip(plans, prompts, steps):
        state = span.start_inference(plan["batch"], 16, adapters=plan.get("adapters", []))
        expected.append([span.inference_step(state, x) for x in [prompt, *mine]])
    before = dict(info(peer).step_batches)

    streams = [SessionStream(peer.stub) for _ in plans]
    answers: list[list] = [[] for _ in plans]
    try:
        for i, (stream, plan) in enumerate(zip(streams, plans)):
            stream.send(open_request(MODEL_ID, START, END, batch_size=plan["batch"], max_length=16,
                                     session_id=f"together-{i}", adapters=plan.get("msgs", [])))
            answers[i].append(stream.send(step_request(1, 0, prompts[i])))

        def decode(i: int, k: int) -> None:
            answers[i].append(streams[i].send(step_request(k + 2, plans[i]["prompt"] + k, steps[i][k])))

        for k in range(3):
            busy = threading.Thread(target=peer.call, args=(peer.runtime.run(Priority.TRAINING, time.sleep, 0.5),))
            busy.start()
            time.sleep(0.05)  # the worker is asleep: every step below waits for it
            senders = [threading.Thread(target=decode, args=(i, k)) for i in range(len(plans))]
            for thread in senders:
                thread.start()
            for thread in senders + [busy]:
                thread.join(30)
    finally:
        for stream in streams:
            stream.close()
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert len(got) == len(want), f"session {i} got {len(got)} answers"
        for answer, w in zip(got, want):
            torch.testing.assert_close(deserialize_tensor(answer.hidden_states), w, atol=5e-5, rtol=1e-4)
    after = dict(info(peer).step_batches)
    grew = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert grew.get(4, 0) == 3, grew  # the four joinable sessions, once per round
    assert grew.get(1, 0) >= 3, grew  # the LoRA session's steps (and the prompts) alone


# --- refusals -------------------------------------------------------------------------------


def forward_error(peer, inputs) -> grpc.RpcError:
    return rpc_error(peer.stub.Forward, pb.ForwardRequest(inputs=inputs), timeout=30)


@pytest.mark.parametrize("change, code, says", [
    (dict(start=0), Code.FAILED_PRECONDITION, "serves blocks [3, 5)"),
    (dict(model_id="other-12345678"), Code.FAILED_PRECONDITION, "serves model"),
    (dict(hidden=hidden(seq=0)), Code.INVALID_ARGUMENT, "has 0 tokens"),
    (dict(hidden=hidden(batch=5)), Code.INVALID_ARGUMENT, "batch 5 must be in [1, 4]"),
    (dict(hidden=hidden(seq=129)), Code.INVALID_ARGUMENT, "this peer takes 1 to 128"),
    (dict(hidden=torch.ones(2, 5, HIDDEN, dtype=torch.int64)), Code.INVALID_ARGUMENT, "must be floating point"),
    (dict(hidden=None), Code.INVALID_ARGUMENT, "hidden_states is missing"),
    (dict(response_codec="zip"), Code.INVALID_ARGUMENT, "response_codec 'zip'"),
    (dict(attention_mask=torch.full((2, 5), 2)), Code.INVALID_ARGUMENT, "must be 0 (padding) or 1"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), Code.INVALID_ARGUMENT, "attention_mask must have shape"),
    (dict(position_ids=torch.ones(2, 5)), Code.INVALID_ARGUMENT, "position_ids must be int64"),
    (dict(position_ids=torch.full((1, 5), -1)), Code.INVALID_ARGUMENT, "position_ids must be in [0, 128)"),
    (dict(deep_prompts=torch.zeros(3, 2, 1, HIDDEN)), Code.INVALID_ARGUMENT, "deep_prompts must have shape"),
    (dict(deep_prompts=torch.full((2, 2, 1, HIDDEN), float("inf"))), Code.INVALID_ARGUMENT, "NaN or infinite"),
    (dict(adapters=[pb.AdapterTensors(method="ia9")]), Code.INVALID_ARGUMENT, "unknown adapter method 'ia9'"),
    (dict(adapters=[pb.AdapterTensors(method="lora", config_json="{")]), Code.INVALID_ARGUMENT, "not valid JSON"),
    (dict(adapters=[pb.AdapterTensors(method="lora", config_json='{"rank": 2}')]), Code.INVALID_ARGUMENT,
     "missing"),
])
def test_bad_forward_requests_are_refused_with_the_reason(peer, change, code, says):
    kwargs = dict(model_id=MODEL_ID, start=START, end=END, hidden=hidden())
    kwargs.update(change)
    model_id, start, end, x = (kwargs.pop(k) for k in ("model_id", "start", "end", "hidden"))
    error = forward_error(peer, span_inputs(model_id, start, end, x, **kwargs))
    assert error.code() == code, error.details()
    assert says in error.details()


def test_bad_adapter_tensors_are_refused(peer, span):
    _, lora_msg = lora_for(span)
    name = next(iter(lora_msg.tensors))
    for mutate, says in [
        (lambda m: m.tensors[name].CopyFrom(serialize_tensor(torch.zeros(3, 3))), "expected"),
        (lambda m: m.tensors["9.self_attn.q_proj.lora_A"].CopyFrom(m.tensors[name]), "outside the span"),
        (lambda m: m.tensors["03.self_attn.q_proj.lora_A"].CopyFrom(m.tensors[name]), "must be '{block}.{tensor}'"),
    ]:
        bad = pb.AdapterTensors()
        bad.CopyFrom(lora_msg)
        mutate(bad)
        error = forward_error(peer, span_inputs(MODEL_ID, START, END, hidden(), adapters=[bad]))
        assert error.code() == Code.INVALID_ARGUMENT and says in error.details(), error.details()


def test_backward_needs_matching_grad_outputs(peer):
    inputs = span_inputs(MODEL_ID, START, END, hidden())
    for grad, says in [(None, "grad_outputs is missing"), (hidden(seq=4), "must equal hidden_states shape"),
                       (torch.full((2, 5, HIDDEN), float("nan")), "NaN")]:
        request = pb.BackwardRequest(inputs=inputs)
        if grad is not None:
            request.grad_outputs.CopyFrom(serialize_tensor(grad))
        error = rpc_error(peer.stub.Backward, request, timeout=30)
        assert error.code() == Code.INVALID_ARGUMENT and says in error.details(), error.details()


def session_error(peer, *requests) -> grpc.RpcError:
    with SessionStream(peer.stub) as stream:
        try:
            for request in requests:
                stream.send(request)
        except grpc.RpcError as e:
            return e
    raise AssertionError("the session was not refused")


def test_bad_sessions_are_refused_and_release_their_cache(peer):
    x = hidden(batch=1, seq=1)
    opened = open_request(MODEL_ID, START, END, max_length=8)
    cases = [
        ((step_request(1, 0, x),), Code.INVALID_ARGUMENT, "must be 'open'"),
        ((pb.InferenceRequest(),), Code.INVALID_ARGUMENT, "an empty message"),
        ((opened, opened), Code.INVALID_ARGUMENT, "must be 'step'"),
        ((open_request(MODEL_ID, 0, END),), Code.FAILED_PRECONDITION, "serves blocks [3, 5)"),
        ((open_request(MODEL_ID, START, END, batch_size=5),), Code.INVALID_ARGUMENT, "batch_size 5"),
        ((open_request(MODEL_ID, START, END, max_length=129),), Code.INVALID_ARGUMENT, "max_length 129"),
        ((open_request(MODEL_ID, START, END, dtype="int64"),), Code.INVALID_ARGUMENT, "dtype 'int64'"),
        ((open_request(MODEL_ID, START, END, batch_size=4, max_length=128), open_request(MODEL_ID, START, END)),
         Code.INVALID_ARGUMENT, "must be 'step'"),  # 512 tokens reserved, then released on error
        ((opened, step_request(1, 1, x)), Code.INVALID_ARGUMENT, "position 1 is ahead of the 0 tokens"),
        ((opened, step_request(1, 0, hidden(batch=1, seq=9))), Code.INVALID_ARGUMENT, "exceeds the session's max_length 8"),
        ((opened, step_request(1, 0, hidden(batch=2, seq=1))), Code.INVALID_ARGUMENT, "opened for batch 1"),
        ((open_request(MODEL_ID, START, END, dtype="float16"), step_request(1, 0, x)), Code.INVALID_ARGUMENT,
         "opened for dtype torch.float16"),
        ((opened, step_request(1, 0, x, hypo_ids=torch.tensor([1]))), Code.INVALID_ARGUMENT, "hypo_ids must be in"),
        ((opened, step_request(1, 0, torch.full((1, 1, HIDDEN), float("nan")))), Code.INVALID_ARGUMENT, "NaN"),
    ]
    for requests, code, says in cases:
        error = session_error(peer, *requests)
        assert error.code() == code and says in error.details(), (says, error.code(), error.details())
    deadline = time.monotonic() + 5
    while info(peer).cache_tokens_free != 4096 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (info(peer).cache_tokens_free, info(peer).active_sessions) == (4096, 0)


def test_session_over_budget_is_resource_exhausted(peer):
    with SessionStream(peer.stub) as holder:
        holder.send(open_request(MODEL_ID, START, END, batch_size=4, max_length=128))  # 512 of 4096
        assert info(peer).cache_tokens_free == 4096 - 512
        error = session_error(peer, open_request(MODEL_ID, START, END, batch_size=4, max_length=1000))
    assert error.code() == Code.INVALID_ARGUMENT  # over max_seq_length: a limit, not the budget
    small = InProcessPeer(peer.service.span, cache_tokens=100)
    try:
        error = session_error(small, open_request(MODEL_ID, START, END, batch_size=2, max_length=64))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert "session needs 128 cache tokens (batch 2 x max_length 64) but this peer has 100 of 100 free" \
            in error.details()
    finally:
        small.close()


def test_sixteen_sessions_of_512_fit_a_default_peer_and_the_17th_is_refused(span):
    from peer.config import PeerConfig

    peer = InProcessPeer(span, cache_tokens=PeerConfig(model="x").cache_tokens,
                         limits=PeerLimits(max_batch_size=4, max_seq_length=512))
    streams = [SessionStream(peer.stub) for _ in range(17)]
    try:
        for i, stream in enumerate(streams[:16]):
            assert stream.send(open_request(MODEL_ID, START, END, max_length=512, session_id=f"s{i}")).step_id == 0
        assert info(peer).cache_tokens_free == 0
        error = rpc_error(streams[16].send, open_request(MODEL_ID, START, END, max_length=512, session_id="s16"))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert "needs 512 cache tokens (batch 1 x max_length 512) but this peer has 0 of 8192 free" in error.details()
    finally:
        for stream in streams:
            stream.__exit__()
        peer.close()


def test_prefix_tokens_count_against_the_cache_budget(peer, span):
    """A prefix-tuning session holds its virtual tokens' keys/values beside the prompt's."""
    method = PrefixTuning(num_virtual_tokens=8)
    tensors = {f"{span.start + i}.{name}": torch.zeros(shape)
               for i, layer in enumerate(span.layers) for name, shape in method.tensor_shapes(layer).items()}
    prefix = pb.AdapterTensors(method=method.name, config_json=method.to_json(),
                               tensors={name: serialize_tensor(t) for name, t in tensors.items()})
    with SessionStream(peer.stub) as stream:
        stream.send(open_request(MODEL_ID, START, END, batch_size=2, max_length=32, adapters=[prefix]))
        assert info(peer).cache_tokens_free == 4096 - 2 * (32 + 8)
    wait_for_free_tokens(peer, 4096)


# --- ending sessions ------------------------------------------------------------------------


def wait_for_free_tokens(peer, expected: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (free := info(peer).cache_tokens_free) != expected:
        assert time.monotonic() < deadline, f"{free} cache tokens free, expected {expected}"
        time.sleep(0.01)


def test_idle_session_times_out_and_frees_its_cache(span):
    peer = InProcessPeer(span, cache_tokens=1000, session_timeout=0.3)
    try:
        with SessionStream(peer.stub) as stream:
            stream.send(open_request(MODEL_ID, START, END, max_length=100))
            stream.send(step_request(1, 0, hidden(batch=1, seq=2)))
            assert info(peer).cache_tokens_free == 900
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream.call)
            assert ended.value.code() == Code.DEADLINE_EXCEEDED and "idle for more than 0.3 s" in ended.value.details()
            assert 0.2 < time.monotonic() - started < 5
        wait_for_free_tokens(peer, 1000)
    finally:
        peer.close()


def test_client_hanging_up_frees_the_cache(peer):
    with SessionStream(peer.stub) as stream:
        stream.send(open_request(MODEL_ID, START, END, max_length=100))
        assert info(peer).cache_tokens_free == 4096 - 100
    # leaving the block cancels the call, as a client that crashes or drops the connection would
    wait_for_free_tokens(peer, 4096)


def test_shutdown_ends_open_sessions_with_unavailable(span):
    peer = InProcessPeer(span, cache_tokens=1000)
    try:
        with SessionStream(peer.stub) as stream:
            stream.send(open_request(MODEL_ID, START, END, max_length=100))
            peer.call(peer.service.close_sessions())
            with pytest.raises(grpc.RpcError) as ended:
                next(stream.call)
            assert ended.value.code() == Code.UNAVAILABLE and "shutting down" in ended.value.details()
        assert (info(peer).cache_tokens_free, info(peer).active_sessions) == (1000, 0)
    finally:
        peer.close()
