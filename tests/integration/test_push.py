"""Server-to-server push (peer/push.py) against a real swarm (DHT + three peer processes).

With push a step goes client -> peer -> peer -> peer, each peer also answering the client.
It must change the route and nothing else: tokens equal local transformers with push on and
off, and the peers' own counters must show they pushed, so a silent fall-back to relaying
through the client fails these tests.
"""

from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria

from client import AutoDistributedModelForCausalLM
from client.transport import PeerConnection
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.loading import load_span
from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2
from tests.peer.rpc_helpers import SessionStream, open_request, rpc_error, step_request

pytestmark = pytest.mark.integration

pb = swarm_pb2
UNREACHABLE = "127.0.0.1:1"  # nothing listens there: a push to it is refused at once


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.swarm.shutdown()


@pytest.fixture
def push(model):
    """Sets push on or off for the test's sessions (the setting is read at every step)."""
    def set_push(on: bool) -> None:
        model.swarm.settings.push = on
    yield set_push
    model.swarm.settings.push = True


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder, dtype=torch.float32).eval()


def pushed_in(endpoints: list[str], session_id: str) -> list[int]:
    """Per peer of the chain: steps of this session it got from the peer before it, as it reports."""
    counts = []
    for endpoint in endpoints:
        [status] = [s for s in PeerConnection.to(endpoint).info().sessions if s.session_id == session_id]
        counts.append(status.steps_pushed_in)
    return counts


def test_push_on_and_off_give_local_greedy_tokens_and_only_push_pushes(model, local, push):
    inputs = model.tokenizer("A quick brown fox", return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=12, do_sample=False)
    outputs, pushed, steps = {}, {}, {}
    for on in (True, False):
        push(on)
        with model.inference_session(max_length=32) as session:
            outputs[on] = model.generate(**inputs, max_new_tokens=12, do_sample=False, session=session)
            assert len(session.endpoints) == 3
            pushed[on], steps[on] = pushed_in(session.endpoints, session.session_id), session.steps
    assert outputs[True].tolist() == outputs[False].tolist() == expected.tolist()
    assert steps[True] == steps[False] == 12
    assert pushed[True] == [0, 12, 12], "the second and third peers must get every step from the peer before"
    assert pushed[False] == [0, 0, 0]


def test_batch_with_left_padding_through_push_matches_local(model, local):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Hello, my name is", "The best way to learn a language is to"], return_tensors="pt",
                       padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the prompts must differ in length for this test"
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with model.inference_session(max_length=32) as session:
        ours = model.generate(**inputs, **options, session=session)
        pushed = pushed_in(session.endpoints, session.session_id)
    assert ours.tolist() == local.generate(**inputs, **options).tolist()
    assert pushed == [0, 8, 8]


@pytest.mark.compat
def test_rolling_back_through_push_matches_local(model, local):
    """A step at an earlier position replaces what followed it, on every peer of the chain."""
    ids = model.tokenizer("One two three four five six", return_tensors="pt")["input_ids"]
    other = model.tokenizer(" seven eight", return_tensors="pt", add_special_tokens=False)["input_ids"]
    keep = 3
    with torch.no_grad(), model.inference_session(max_length=32) as session:
        first = model.parts.logits(session.step(model.parts.embed(ids)))
        session.position = keep  # forget everything after the first `keep` tokens
        second = model.parts.logits(session.step(model.parts.embed(other)))
        pushed = pushed_in(session.endpoints, session.session_id)
        held = [s.position for endpoint in session.endpoints for s in PeerConnection.to(endpoint).info().sessions
                if s.session_id == session.session_id]
        theirs_first = local(ids).logits
        theirs_second = local(torch.cat([ids[:, :keep], other], dim=1)).logits[:, keep:]
    torch.testing.assert_close(first, theirs_first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, theirs_second, atol=1e-4, rtol=1e-4)
    assert pushed == [0, 2, 2]
    assert held == [keep + other.shape[1]] * 3


class CutPushLink(StoppingCriteria):
    """Midway through generation, the first peer's pushes start failing: the address it is
    told for the second peer goes nowhere (a link between two peers that is down while both
    still reach the client). The client's own stream to the second peer is untouched."""

    def __init__(self, session, after_tokens: int):
        self.session, self.after_tokens, self.cut_after_steps = session, after_tokens, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.cut_after_steps is None and input_ids.shape[1] >= self.after_tokens:
            second = self.session._hops[1]  # what the session tells the first peer to push to
            unreachable = second.hop.peer.model_copy(update={"endpoint": UNREACHABLE})
            second.hop = dataclasses.replace(second.hop, peer=unreachable)
            self.cut_after_steps = self.session.steps
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_failed_push_is_sent_by_the_client_and_tokens_stay_the_same(model, local, caplog):
    inputs = model.tokenizer("The capital of France is", return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=10, do_sample=False)
    with caplog.at_level("WARNING", logger="client.session"), model.inference_session(max_length=32) as session:
        cut = CutPushLink(session, inputs["input_ids"].shape[1] + 4)
        ours = model.generate(**inputs, max_new_tokens=10, do_sample=False, session=session, stopping_criteria=[cut])
        endpoints = [h.stream.connection.endpoint for h in session._hops]  # the second one's is cut
        pushed = pushed_in(endpoints, session.session_id)
    assert ours.tolist() == expected.tolist()
    assert f"to {UNREACHABLE} failed" in caplog.text and "the client sends step" in caplog.text
    # Until the cut, the first peer pushed to the second; after it the client fed the second,
    # which went on pushing to the third.
    assert cut.cut_after_steps is not None
    assert pushed == [0, cut.cut_after_steps, session.steps]


def test_peer_pushes_on_drops_a_second_copy_and_reports_a_failed_push(swarm):
    """The protocol between two peer processes, driven by hand: A runs a step and pushes its
    output into B's session; a copy sent to B again is dropped; a push that cannot be
    delivered is reported to A's client after A's answer."""
    first, second = (PeerConnection.to(endpoint) for endpoint in swarm.endpoints[:2])
    model_id, session_id = first.info().model_id, uuid.uuid4().hex
    local = load_span(resolve_checkpoint(DEFAULT_MODEL), 10, 20)
    state = local.start_inference(batch_size=1, max_length=16)
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randn(1, n, 576, generator=generator) for n in (3, 1, 1)]

    def to_a(step_id: int, position: int, x: torch.Tensor, push_to: str) -> pb.InferenceRequest:
        request = step_request(step_id, position, x)
        request.step.push_to.add(endpoint=push_to, session_id=session_id)
        return request

    with SessionStream(first.stub) as on_a, SessionStream(second.stub) as on_b:
        assert on_a.send(open_request(model_id, 0, 10, max_length=16, session_id=session_id)).supports_push
        assert on_b.send(open_request(model_id, 10, 20, max_length=16, session_id=session_id)).supports_push
        a1 = on_a.send(to_a(1, 0, tokens[0], second.endpoint))
        b1 = next(on_b.call)  # B answers a step it got from A, not from us
        assert (b1.step_id, b1.position) == (1, 3)
        torch.testing.assert_close(deserialize_tensor(b1.hidden_states),
                                   local.inference_step(state, deserialize_tensor(a1.hidden_states)), atol=1e-5, rtol=0)

        on_b._requests.put(pb.InferenceRequest(step=pb.InferenceStep(step_id=1, position=0,
                                                                     hidden_states=a1.hidden_states)))
        a2 = on_a.send(to_a(2, 3, tokens[1], second.endpoint))
        b2 = next(on_b.call)  # not a second answer to step 1: that copy was dropped
        assert (b2.step_id, b2.position) == (2, 4)
        torch.testing.assert_close(deserialize_tensor(b2.hidden_states),
                                   local.inference_step(state, deserialize_tensor(a2.hidden_states)), atol=1e-5, rtol=0)

        a3 = on_a.send(to_a(3, 4, tokens[2], UNREACHABLE))
        assert a3.step_id == 3 and a3.HasField("hidden_states") and not a3.push_error
        report = next(on_a.call)
        assert report.step_id == 3 and not report.HasField("hidden_states")
        assert f"push of step 3 to {UNREACHABLE} failed" in report.push_error

        status = [s for s in second.info().sessions if s.session_id == session_id]
        assert [(s.position, s.steps_pushed_in) for s in status] == [(4, 2)]

    unknown = pb.PushRequest(session_id="no-such-session",
                             step=pb.InferenceStep(step_id=1, hidden_states=serialize_tensor(tokens[1])))
    assert rpc_error(second.stub.Push, unknown, timeout=10).code() == grpc.StatusCode.NOT_FOUND
    info = second.info()
    assert "push" in info.capabilities and info.pushes_received >= 2


@pytest.mark.parametrize("codec, atol", [("float16", 0.05), ("int8", 0.5)])
def test_lossy_codecs_through_push_stay_close_to_local(model, local, codec, atol):
    """Every hop of a pushed step (client -> peer -> peer -> peer -> client) carries the codec:
    logits stay within the codec's error of local fp32, and each peer reports it was sent them."""
    ids = model.tokenizer("The best way to learn a language is to", return_tensors="pt")["input_ids"]
    model.swarm.settings.codec = codec
    try:
        with torch.no_grad(), model.inference_session(max_length=32) as session:
            prefill = model.parts.logits(session.step(model.parts.embed(ids[:, :-1])))
            step = model.parts.logits(session.step(model.parts.embed(ids[:, -1:])))
            pushed = pushed_in(session.endpoints, session.session_id)
    finally:
        model.swarm.settings.codec = "raw"
    with torch.no_grad():
        theirs = local(ids).logits
    ours = torch.cat([prefill, step], dim=1)
    error = (ours - theirs).abs().max().item()
    assert 0 < error < atol, f"{codec}: max logit error {error}"
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    assert pushed == [0, 2, 2]
