"""peer.span_switch: the servicer a peer's gRPC server holds, forwarding to the BlockService
of its current span; in this process over real gRPC."""

from __future__ import annotations

import grpc
import pytest
import torch

from peer.config import PeerLimits
from peer.memory import CacheBudget
from peer.rpc_handlers import add_to_server
from peer.service import BlockService, ServedModel
from peer.span_switch import SpanSwitch
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.wire import swarm_pb2
from tests.peer.rpc_helpers import BackgroundServer, SessionStream, open_request, span_inputs, step_request

pb = swarm_pb2
MODEL_ID = "smollm2-135m-instruct-testtest"


class SwitchedPeer(BackgroundServer):
    def __init__(self) -> None:
        super().__init__()
        self.switch = SpanSwitch()
        self.start(lambda server: add_to_server(self.switch, server))

    def service(self, span) -> BlockService:
        served = ServedModel(model_id=MODEL_ID, model_name="smollm2-135m-instruct", num_blocks=30, throughput=1.0)
        return BlockService(span, served, self.runtime, CacheBudget(1024), PeerLimits(), 30.0)


@pytest.fixture(scope="module")
def peer():
    peer = SwitchedPeer()
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def spans():
    checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    return load_span(checkpoint, 0, 1), load_span(checkpoint, 5, 6)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def test_calls_go_to_the_current_span_and_between_spans_are_unavailable(peer, spans):
    first, second = spans
    error = refusal(lambda: peer.stub.Info(pb.InfoRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()

    peer.switch.serve(peer.service(first))
    assert peer.stub.Info(pb.InfoRequest(), timeout=10).start == 0
    hidden = torch.randn(1, 2, 576)
    peer.stub.Forward(pb.ForwardRequest(inputs=span_inputs(MODEL_ID, 0, 1, hidden)), timeout=30)

    peer.switch.serve(None, unavailable="peer is loading blocks 5:6; try another peer")
    error = refusal(lambda: peer.stub.Forward(pb.ForwardRequest(inputs=span_inputs(MODEL_ID, 0, 1, hidden)),
                                              timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "blocks 5:6" in error.details()

    peer.switch.serve(peer.service(second))
    info = peer.stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.start, info.end) == (5, 6)


def test_draining_refuses_new_sessions_while_open_ones_go_on(peer, spans):
    peer.switch.serve(peer.service(spans[0]))
    hidden = torch.randn(1, 1, 576)
    with SessionStream(peer.stub) as open_one:
        open_one.send(open_request(MODEL_ID, 0, 1, max_length=8))
        peer.switch.refuse_sessions("peer is leaving blocks 0:1; open the session on another peer")
        with SessionStream(peer.stub) as new_one:
            error = refusal(lambda: new_one.send(open_request(MODEL_ID, 0, 1, max_length=8, session_id="new")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "leaving blocks 0:1" in error.details()
        assert open_one.send(step_request(1, 0, hidden)).position == 1  # the open session goes on
        peer.stub.Forward(pb.ForwardRequest(inputs=span_inputs(MODEL_ID, 0, 1, hidden)), timeout=30)
    peer.switch.refuse_sessions(None)
    with SessionStream(peer.stub) as again:
        again.send(open_request(MODEL_ID, 0, 1, max_length=8, session_id="again"))
