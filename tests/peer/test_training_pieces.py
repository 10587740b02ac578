"""A training call does not hold the peer: BlockService runs a Forward or Backward block by
block and lets the inference steps waiting by then run between two blocks (the runtime's
`make_way`), so a decode step sent while a long training call runs is answered before the call
ends, with the output it has alone; Info counts the pieces training calls ran in.

On a real 6-block span over real gRPC, in this process. Each block of a training call is made
slow on purpose (a sleep before its forward and its backward, for inputs of more than one
token), so the order holds on a loaded machine: a decode step (one token) is not slowed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from peer.config import PeerLimits
from peer.memory import CacheBudget
from peer.service import BlockService, ServedModel
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2, swarm_pb2_grpc
from tests.peer.rpc_helpers import BackgroundServer, SessionStream, lora_for, open_request, span_inputs, step_request

pb = swarm_pb2
MODEL_ID = "smollm2-135m-instruct-testtest"
START, END = 0, 6
BLOCKS = END - START
HIDDEN = 576
BLOCK_SECONDS = 0.15  # what each block of a training call takes here, at least


class InProcessPeer(BackgroundServer):
    def __init__(self, span) -> None:
        super().__init__()
        served = ServedModel(model_id=MODEL_ID, model_name="smollm2-135m-instruct", num_blocks=30, throughput=1.0)
        self.service = BlockService(span, served, self.runtime, CacheBudget(4096),
                                    PeerLimits(max_batch_size=4, max_seq_length=128), 30.0)
        self.start(lambda server: swarm_pb2_grpc.add_BlockServiceServicer_to_server(self.service, server))


def _slow_training_block(module, args):
    hidden = args[0]
    if hidden.shape[1] > 1:
        time.sleep(BLOCK_SECONDS)
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: time.sleep(BLOCK_SECONDS))


@pytest.fixture(scope="module")
def span():
    span = load_span(resolve_checkpoint("smollm2-135m-instruct"), START, END)
    handles = [layer.register_forward_pre_hook(_slow_training_block) for layer in span.layers]
    yield span
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="module")
def peer(span):
    peer = InProcessPeer(span)
    yield peer
    peer.close()


def hidden(batch=2, seq=16, seed=0) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def pieces(peer) -> int:
    return peer.stub.Info(pb.InfoRequest(), timeout=10).training_pieces


def forward_with_graph(peer, inputs, grad):
    peer.stub.Forward(pb.ForwardRequest(inputs=inputs, backward_id="kept"), timeout=60)
    return backward(peer, inputs, grad, "kept")


def backward(peer, inputs, grad, backward_id: str = ""):
    return peer.stub.Backward(pb.BackwardRequest(inputs=inputs, grad_outputs=serialize_tensor(grad),
                                                 backward_id=backward_id), timeout=60)


CALLS = {  # what the training client sends; how many pieces it runs in, how many before the one measured
    "forward": (lambda peer, inputs, grad: peer.stub.Forward(pb.ForwardRequest(inputs=inputs), timeout=60),
                BLOCKS, 0),
    "backward, recomputed": (backward, 2 * BLOCKS, BLOCKS),  # decode step sent during the backward pass
    "backward, kept graph": (forward_with_graph, 2 * BLOCKS, BLOCKS),
}


@pytest.mark.parametrize("kind", list(CALLS))
def test_a_decode_step_runs_between_the_blocks_of_a_training_call(peer, span, kind):
    call, expected_pieces, wait_for = CALLS[kind]
    lora, lora_msg = lora_for(span, seed=1)  # the training call's adapter must not reach the session
    tokens = [hidden(batch=1, seq=1, seed=2), hidden(batch=1, seq=1, seed=3)]
    state = span.start_inference(1, 8)
    alone = [span.inference_step(state, x) for x in tokens]
    inputs = span_inputs(MODEL_ID, START, END, hidden(seed=4), adapters=[lora_msg])
    grad = hidden(seed=5)

    with SessionStream(peer.stub) as stream:
        stream.send(open_request(MODEL_ID, START, END, max_length=8))
        first = stream.send(step_request(1, 0, tokens[0]))
        before = pieces(peer)
        trained = {}

        def train() -> None:
            call(peer, inputs, grad)
            trained["at"] = time.monotonic()

        trainer = threading.Thread(target=train)
        trainer.start()
        deadline = time.monotonic() + 30
        while pieces(peer) - before <= wait_for:  # until the part we measure has begun
            assert time.monotonic() < deadline and trainer.is_alive(), "the training call did not start"
            time.sleep(0.005)
        second = stream.send(step_request(2, 1, tokens[1]))
        answered = time.monotonic()
        pieces_then = pieces(peer) - before
        trainer.join(60)

    assert "at" in trained, "the training call failed"
    assert answered < trained["at"], "the decode step waited for the whole training call"
    assert wait_for < pieces_then < expected_pieces, "answered between two pieces of the training call"
    assert pieces(peer) - before == expected_pieces
    for answer, want in zip([first, second], alone):
        torch.testing.assert_close(deserialize_tensor(answer.hidden_states), want, atol=1e-5, rtol=0)
