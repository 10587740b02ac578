"""client.transport over real gRPC to an in-process BlockService that scripts its answers:
errors become PeerCallError with their status code, and an Inference stream matches answers
to steps, reports push errors, and times out a peer that stops answering."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from client.transport import PeerCallError, PeerConnection
from swarm.wire import swarm_pb2, swarm_pb2_grpc


class ScriptedPeer(swarm_pb2_grpc.BlockServiceServicer):
    """Answers step N with step N, after a leftover push_error of step N - 1; step 99 never."""

    def __init__(self):
        self.release = threading.Event()

    def Info(self, request, context):
        return swarm_pb2.PeerInfo()

    def Forward(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad span")

    def Inference(self, requests, context):
        for request in requests:
            if request.HasField("open"):
                yield swarm_pb2.InferenceResponse(supports_push=True)
                continue
            step = request.step.step_id
            if step == 99:
                self.release.wait(5)
                continue
            yield swarm_pb2.InferenceResponse(step_id=step - 1, push_error="late: next peer gone")
            yield swarm_pb2.InferenceResponse(step_id=step, position=step)
            if step == 3:
                yield swarm_pb2.InferenceResponse(step_id=3, push_error="push of 3 failed")


@pytest.fixture(scope="module")
def endpoint():
    servicer = ScriptedPeer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    swarm_pb2_grpc.add_BlockServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(0)


def test_connections_are_shared_and_errors_carry_their_code(endpoint):
    connection = PeerConnection.to(endpoint)
    assert PeerConnection.to(endpoint) is connection
    connection.info(timeout=5)
    with pytest.raises(PeerCallError, match="INVALID_ARGUMENT: bad span") as error:
        connection.forward(swarm_pb2.ForwardRequest(), timeout=5)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.endpoint == endpoint


def test_an_inference_stream_matches_answers_to_steps(endpoint):
    stream = PeerConnection.to(endpoint).open_inference(swarm_pb2.InferenceOpen(), timeout=5)
    assert stream.supports_push
    assert stream.step(swarm_pb2.InferenceStep(step_id=2)).position == 2, "step 1's late push_error is skipped"
    assert stream.step(swarm_pb2.InferenceStep(step_id=3)).step_id == 3
    deadline = time.monotonic() + 5  # push_problem does not wait: the error comes just after the answer
    while (problem := stream.push_problem(3)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert problem == "push of 3 failed"
    assert stream.push_problem(3) is None
    stream.close()
    with pytest.raises(PeerCallError, match="closed"):
        stream.send(swarm_pb2.InferenceStep(step_id=4))


def test_a_peer_that_stops_answering_times_out(endpoint):
    stream = PeerConnection.to(endpoint).open_inference(swarm_pb2.InferenceOpen(), timeout=0.3)
    stream.send(swarm_pb2.InferenceStep(step_id=99))
    assert stream.answer(99, wait=0.05) is None
    with pytest.raises(PeerCallError, match="no answer within 0.3 s") as error:
        stream.answer(99)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and stream.closed
