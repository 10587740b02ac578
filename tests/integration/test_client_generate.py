"""The client against a real swarm (DHT + three peer processes on 127.0.0.1): everything
that comes out must equal local transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TextStreamer

from client import AutoDistributedModelForCausalLM
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

pytestmark = pytest.mark.integration

PROMPTS = ["A quick brown fox", "The capital of France is", "def fibonacci(n):"]



@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.swarm.shutdown()


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.compat
def test_greedy_matches_local(model, local, prompt):
    inputs = model.tokenizer(prompt, return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    theirs = local.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.compat
def test_greedy_screens_the_head_and_anything_reading_scores_gets_the_full_head(model, local, monkeypatch):
    """Greedy picks through the int8 copy of the head (client/greedy_head.py), with masking
    processors too (`min_new_tokens` masks EOS); outputs that carry the scores, and processors
    that change them, never see it."""
    from client.greedy_head import GreedySteps

    screened = []

    def spy(self, *args):
        logits = real(self, *args)
        screened.append(logits is not None)
        return logits

    real = GreedySteps.logits
    monkeypatch.setattr(GreedySteps, "logits", spy)
    inputs = model.tokenizer(PROMPTS[0], return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == local.generate(**inputs, max_new_tokens=12, do_sample=False).tolist()
    assert len(screened) == 12 and all(screened)

    screened.clear()
    chat = model.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                               add_generation_prompt=True)
    chat = model.tokenizer(chat, return_tensors="pt")
    options = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)  # past where EOS would win
    ours, theirs = model.generate(**chat, **options), local.generate(**chat, **options)
    assert ours.tolist() == theirs.tolist()
    assert local.generate(**chat, max_new_tokens=40, do_sample=False).shape[1] < theirs.shape[1]
    assert len(screened) == 40 and all(screened)

    screened.clear()
    options = dict(max_new_tokens=6, do_sample=False, output_scores=True, output_logits=True,
                   return_dict_in_generate=True)
    ours, theirs = model.generate(**inputs, **options), local.generate(**inputs, **options)
    assert screened == []
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), atol=1e-4, rtol=1e-4)
    model.generate(**inputs, max_new_tokens=3, do_sample=False, repetition_penalty=1.2)  # changes scores
    assert screened == []


@pytest.mark.compat
def test_batch_with_left_padding_matches_local(model, local):
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Hello, my name is", "The best way to learn a language is to"], return_tensors="pt",
                       padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the prompts must differ in length for this test"
    ours = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    theirs = local.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.compat
def test_sampling_with_seed_matches_local(model, local):
    inputs = model.tokenizer("Once upon a time", return_tensors="pt")
    options = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, max_new_tokens=20)
    torch.manual_seed(7)
    ours = model.generate(**inputs, **options)
    torch.manual_seed(7)
    theirs = local.generate(**inputs, **options)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.compat
def test_beam_search_matches_local(model, local):
    inputs = model.tokenizer("The meaning of life is", return_tensors="pt")
    ours = model.generate(**inputs, num_beams=3, max_new_tokens=10, do_sample=False)
    theirs = local.generate(**inputs, num_beams=3, max_new_tokens=10, do_sample=False)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.compat
def test_eos_stops_and_streamer_streams(model, local, capsys):
    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=200, do_sample=False,
                          streamer=TextStreamer(tokenizer, skip_prompt=True))
    theirs = local.generate(**inputs, max_new_tokens=200, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert ours.shape[1] < inputs["input_ids"].shape[1] + 200, "generation should stop at EOS"
    new_text = tokenizer.decode(ours[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert new_text.strip() and new_text.strip() in capsys.readouterr().out


@pytest.mark.compat
def test_loss_and_logits_match_local(model, local):
    inputs = model.tokenizer(["A quick brown fox jumps over the lazy dog"], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs, labels=inputs["input_ids"])
        theirs = local(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)


def test_model_parameters_are_only_the_clients(model):
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert names == {"parts"}
    assert sum(p.numel() for p in model.parameters()) == model.config.vocab_size * model.config.hidden_size \
        + model.config.hidden_size  # tied embeddings/head + final norm: no block weights on the client


@pytest.mark.compat
def test_demo_answers_as_local_transformers(model, local):
    """`make demo`'s own code path: its answer is local transformers' greedy answer."""
    from client.apps.demo import answer

    ours, _ = answer(model, model.tokenizer)
    theirs, _ = answer(local, model.tokenizer)
    assert ours == theirs == "The capital of France is Paris."


def test_a_bfloat16_client_generates(swarm):
    """Its sessions open for bfloat16, the dtype its hidden states have (peers refuse steps of
    another dtype than the session's), and its generate runs through them."""
    bf16 = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers,
                                                           dtype=torch.bfloat16)
    try:
        inputs = bf16.tokenizer("The capital of France is", return_tensors="pt")
        ours = bf16.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert ours.shape[1] == inputs["input_ids"].shape[1] + 4
        assert bf16(**inputs).logits.dtype == torch.bfloat16
    finally:
        bf16.swarm.shutdown()
