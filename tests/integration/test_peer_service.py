"""Real `swarm peer` processes, joined to a real `swarm dht`, driven over real gRPC.

Outputs must equal the same span run in this process; bad requests must get the right
status while the peer keeps serving; the peer must announce itself, and withdraw and exit
cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import hivemind
import pytest
import torch

from swarm import registry
from swarm.blocks import SpanInputs
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2
from tests.integration.conftest import PeerProcess, SwarmProcs
from tests.peer.rpc_helpers import SessionStream, open_request, rpc_error, span_inputs, step_request
from tests.procs import group_members

pytestmark = pytest.mark.integration

pb = swarm_pb2
Code = grpc.StatusCode
HIDDEN, NUM_BLOCKS = 576, 30


@pytest.fixture(scope="module")
def peers(swarm_procs: SwarmProcs) -> dict[str, PeerProcess]:
    # Started together, so their start-ups overlap.
    started = {
        "main": swarm_procs.start_peer("--blocks", "0:10"),
        "small": swarm_procs.start_peer("--blocks", "0:10", "--cache-tokens", "1000", "--max-message-mb", "1"),
        "doomed": swarm_procs.start_peer("--blocks", "10:20"),
    }
    return {name: peer.wait_ready() for name, peer in started.items()}


@pytest.fixture(scope="module")
def peer(peers) -> PeerProcess:
    return peers["main"]


@pytest.fixture(scope="module")
def stub(peer):
    return peer.stub()


@pytest.fixture(scope="module")
def local_span():
    return load_span(resolve_checkpoint("smollm2-135m-instruct"), 0, 10)


def hidden(batch=2, seq=5, seed=0) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_info_describes_the_served_span(peer, stub):
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.model_id, info.model_name, info.start, info.end, info.num_blocks) == \
        (peer.model_id, "smollm2-135m-instruct", 0, 10, NUM_BLOCKS)
    assert (info.dtype, info.cache_tokens_total, info.cache_tokens_free, info.active_sessions) == \
        ("float32", 8192, 8192, 0)
    assert (info.max_batch_size, info.max_seq_length, info.max_message_bytes) == (64, 4096, 64 * 2**20)
    assert info.throughput > 0 and info.version


def test_forward_equals_local_span(peer, stub, local_span):
    x, mask = hidden(), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    answer = stub.Forward(pb.ForwardRequest(inputs=span_inputs(peer.model_id, 0, 10, x, attention_mask=mask)),
                          timeout=30)
    with torch.no_grad():
        expected = local_span.forward(SpanInputs(x, mask))
    torch.testing.assert_close(deserialize_tensor(answer.hidden_states), expected, atol=1e-5, rtol=0)


def test_backward_equals_local_span(peer, stub, local_span):
    """A Backward with no Forward before it: peers keep no training state between calls."""
    x, grad = hidden(seed=1), hidden(seed=2)
    request = pb.BackwardRequest(inputs=span_inputs(peer.model_id, 0, 10, x), grad_outputs=serialize_tensor(grad))
    answer = stub.Backward(request, timeout=30)
    expected = local_span.backward(SpanInputs(x), grad)
    torch.testing.assert_close(deserialize_tensor(answer.grad_hidden_states), expected.hidden_states,
                               atol=1e-5, rtol=0)
    assert not answer.HasField("grad_deep_prompts") and not answer.grad_adapters


def test_inference_stream_equals_local_steps(peer, stub, local_span):
    prefill, tokens = hidden(batch=1, seq=5, seed=3), [hidden(batch=1, seq=1, seed=4 + i) for i in range(3)]
    state = local_span.start_inference(batch_size=1, max_length=16)
    expected = [local_span.inference_step(state, x) for x in [prefill, *tokens]]

    with SessionStream(stub) as stream:
        opened = stream.send(open_request(peer.model_id, 0, 10, max_length=16))
        assert (opened.step_id, opened.position) == (0, 0)
        answers = [stream.send(step_request(1, 0, prefill))]
        answers += [stream.send(step_request(2 + i, 5 + i, x)) for i, x in enumerate(tokens)]
        assert stub.Info(pb.InfoRequest(), timeout=10).cache_tokens_free == 8192 - 16
        stream.close()
    assert [(a.step_id, a.position) for a in answers] == [(1, 5), (2, 6), (3, 7), (4, 8)]
    for answer, want in zip(answers, expected):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)


def session_error(stub, *requests) -> grpc.RpcError:
    with SessionStream(stub) as stream:
        try:
            for request in requests:
                stream.send(request)
        except grpc.RpcError as e:
            return e
    raise AssertionError("the session was not refused")


def test_bad_requests_get_the_right_status_and_the_peer_keeps_serving(peer, stub):
    def forward(inputs):
        return rpc_error(stub.Forward, pb.ForwardRequest(inputs=inputs), timeout=30)

    wrong_span = forward(span_inputs(peer.model_id, 0, 5, hidden()))
    assert wrong_span.code() == Code.FAILED_PRECONDITION and "serves blocks [0, 10)" in wrong_span.details()

    wrong_size = forward(span_inputs(peer.model_id, 0, 10, torch.randn(2, 5, 64)))
    assert wrong_size.code() == Code.INVALID_ARGUMENT and "(batch, seq, 576)" in wrong_size.details()

    with_nan = hidden()
    with_nan[1, 2, 3] = float("nan")
    nan = forward(span_inputs(peer.model_id, 0, 10, with_nan))
    assert nan.code() == Code.INVALID_ARGUMENT and "NaN" in nan.details()

    truncated = span_inputs(peer.model_id, 0, 10, hidden())
    truncated.hidden_states.data = truncated.hidden_states.data[:-3]
    short = forward(truncated)
    assert short.code() == Code.INVALID_ARGUMENT and "bytes" in short.details()

    before_open = session_error(stub, step_request(1, 0, hidden(batch=1, seq=1)))
    assert before_open.code() == Code.INVALID_ARGUMENT and "must be 'open'" in before_open.details()

    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.start, info.end, info.cache_tokens_free, info.active_sessions) == (0, 10, 8192, 0)


def test_budget_and_message_size_limits_are_resource_exhausted(peers):
    small = peers["small"]
    stub = small.stub()
    over = session_error(stub, open_request(small.model_id, 0, 10, batch_size=2, max_length=1024))
    assert over.code() == Code.RESOURCE_EXHAUSTED, over.details()
    assert "needs 2048 cache tokens (batch 2 x max_length 1024) but this peer has 1000 of 1000 free" in over.details()

    too_big = span_inputs(small.model_id, 0, 10, hidden(batch=1, seq=600))  # 1.4 MB > --max-message-mb 1
    error = rpc_error(stub.Forward, pb.ForwardRequest(inputs=too_big), timeout=30)
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()

    with SessionStream(stub) as stream:  # a session that fits still opens
        stream.send(open_request(small.model_id, 0, 10, max_length=1000))
        assert stub.Info(pb.InfoRequest(), timeout=10).cache_tokens_free == 0


def test_random_bytes_on_the_port_do_not_kill_the_peer(peer, stub):
    garbage = [os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n"]
    for payload in garbage:
        with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.settimeout(1.0)
            try:
                sock.recv(1024)
            except (TimeoutError, ConnectionError):
                pass
    assert peer.proc.poll() is None, peer.output()
    assert stub.Info(pb.InfoRequest(), timeout=10).end == 10


def records_of(dht: hivemind.DHT, peer: PeerProcess) -> dict[int, registry.PeerRecord]:
    found = registry.fetch_span_records(dht, peer.model_id, NUM_BLOCKS)
    return {i: r for i, records in found.items() for r in records if r.endpoint == peer.endpoint}


def test_records_appear_in_the_dht_and_are_withdrawn_on_sigterm(peers, dht_maddr):
    doomed = peers["doomed"]
    reader = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[dht_maddr])
    try:
        mine = records_of(reader, doomed)
        assert sorted(mine) == list(range(10, 20)), mine  # announced before "peer ready"
        record = mine[10]
        assert (record.model_id, record.start, record.end, record.state, record.dtype) == \
            (doomed.model_id, 10, 20, registry.PeerState.online, "float32")
        assert record.throughput > 0 and record.cache_tokens_free == 8192 and record.fingerprint
        model = registry.fetch_model(reader, doomed.model_id)
        assert model is not None and (model.model_name, model.num_blocks) == ("smollm2-135m-instruct", NUM_BLOCKS)

        doomed.proc.send_signal(signal.SIGTERM)  # the leader only: it must take its DHT process down itself
        assert doomed.proc.wait(timeout=20) == 0, doomed.output()
        deadline = time.monotonic() + 5
        while group_members(doomed.proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(doomed.proc) == [], doomed.output()
        assert records_of(reader, doomed) == {}
    finally:
        reader.shutdown()
