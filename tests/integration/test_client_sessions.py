"""Multi-turn inference sessions and the remote blocks as a torch module, against a real swarm."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, SessionError
from client.transport import PeerConnection
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.loading import load_span

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.swarm.shutdown()


@pytest.mark.compat
def test_three_chat_turns_in_one_session_match_local_full_history(swarm, model):
    local = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder).eval()
    tokenizer = model.tokenizer
    turns = ["Hi! What is your name?", "What is 2 + 2?", "Thanks. Say goodbye."]
    history = None
    with model.inference_session(max_length=512) as session:
        for i, text in enumerate(turns):
            message = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
            new_ids = tokenizer(message, return_tensors="pt")["input_ids"]
            held_before = session.position
            ours = model.generate(new_ids, max_new_tokens=12, do_sample=False, session=session)
            full = new_ids if history is None else torch.cat([history, new_ids], dim=1)
            theirs = local.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=12, do_sample=False)
            assert ours.tolist() == theirs[:, history.shape[1] if history is not None else 0:].tolist(), f"turn {i}"
            history = theirs
            # The peers hold the whole history but the last chosen token; each turn sent only new tokens.
            assert session.position == history.shape[1] - 1
            sent = session.position - held_before
            # this turn's tokens but its last (never fed), plus the previous turn's last token
            assert sent == ours.shape[1] - 1 + (1 if i else 0)
            # What the peers themselves report: they hold the whole history and have received
            # each token once, so no turn resent the history.
            for endpoint in swarm.endpoints:
                peer_view = [s for s in PeerConnection.to(endpoint).info().sessions
                             if s.session_id == session.session_id]
                assert len(peer_view) == 1
                assert peer_view[0].position == session.position
                assert peer_view[0].tokens_received == session.position


def test_exceeding_session_max_length_is_a_clear_error(model):
    ids = model.tokenizer("One two three four five", return_tensors="pt")["input_ids"]
    with model.inference_session(max_length=8) as session:
        with pytest.raises(SessionError, match="max_length is 8"):
            model.generate(ids, max_new_tokens=20, do_sample=False, session=session)


def test_remote_layers_slice_matches_local_blocks(model):
    layers = model.model.layers[10:20]
    assert len(layers) == 10
    local = load_span(resolve_checkpoint(DEFAULT_MODEL), 10, 20)
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, model.config.hidden_size)
    ours_in = hidden.clone().requires_grad_(True)
    theirs_in = hidden.clone().requires_grad_(True)
    ours = layers(ours_in)
    with torch.enable_grad():
        theirs = local(theirs_in)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-4, rtol=1e-3)
