"""Verification against peers that lie (`swarm peer --lie`, peer/lying.py): real processes.

Blocks [15, 30) are served by two honest peers and a liar that announces ten times its speed,
so routing sends the work its way; blocks [0, 15) by one honest peer (unverifiable, and left
so). Without verification the liar changes the tokens; with it, the tokens and the loss curve
are the honest ones, the liar is banned and flagged in the DHT, and no honest peer is.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.flags import count_flags, flags_key

pytestmark = pytest.mark.integration

PROMPT = "A quick brown fox"


@pytest.fixture(scope="module")
def honest():
    resolve_checkpoint(DEFAULT_MODEL)
    with LocalSwarm(["0:15", "15:30", "15:30"]) as running:
        yield running


@pytest.fixture(scope="module")
def liar(honest):
    with LocalSwarm(["15:30"], dht_initial_peers=honest.initial_peers, extra_peer_args=["--lie", "always"]) as running:
        yield running


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder).eval()


def client(swarm, verify: float, **kwargs):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers,
                                                            settings=SwarmSettings(verify=verify), **kwargs)
    if model.swarm.verifier is not None:
        model.swarm.verifier.rng.seed(0)
    return model


def peer_id(model, endpoint: str) -> str:
    return next(r.peer_id for rs in model.swarm.records().values() for r in rs if r.endpoint == endpoint)


def flagged(model) -> dict[str, int]:
    return count_flags(model.swarm.model_id, model.swarm.dht.get(flags_key(model.swarm.model_id), latest=True))


def test_a_liar_on_every_call_is_caught_before_it_changes_a_token(honest, liar, local):
    inputs = local_inputs = None
    trusting = client(honest, verify=0.0)
    try:
        inputs = trusting.tokenizer(PROMPT, return_tensors="pt")
        local_inputs = dict(inputs)
        expected = local.generate(**local_inputs, max_new_tokens=16, do_sample=False)
        assert not torch.equal(trusting.generate(**inputs, max_new_tokens=16, do_sample=False), expected), \
            "the liar did not change the tokens: this test would pass without verification"
    finally:
        trusting.swarm.shutdown()

    model = client(honest, verify=0.2)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), expected)
        liar_id = peer_id(model, liar.endpoints[0])
        assert model.swarm.verifier.convicted == {liar_id}
        assert set(flagged(model)) == {liar_id}  # flagged for other clients; no honest peer is
    finally:
        model.swarm.shutdown()


def test_fine_tuning_through_a_liar_gives_the_honest_loss_curve(honest, liar):
    def losses(verify: float, avoid: str | None = None) -> list[float]:
        torch.manual_seed(0)
        model = client(honest, verify=verify, tuning_mode="lora")
        try:
            if avoid:
                model.swarm.routes.ban(peer_id(model, avoid), math.inf)  # the honest run never meets it
            batch = model.tokenizer(["The swarm trains a small adapter.", "Peers may lie; clients check."],
                                    return_tensors="pt", padding=True)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            curve = []
            for _ in range(3):
                loss = model(**batch, labels=batch["input_ids"]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                curve.append(loss.item())
            if verify:
                assert model.swarm.verifier.convicted == {peer_id(model, liar.endpoints[0])}
            return curve
        finally:
            model.swarm.shutdown()

    honest_curve = losses(0.0, avoid=liar.endpoints[0])
    assert losses(0.2) == pytest.approx(honest_curve, rel=1e-4)
    assert losses(0.0) != pytest.approx(honest_curve, rel=1e-2), "the liar did not change the loss"


class _Caught(StoppingCriteria):
    """Records how many tokens were generated when the verifier first convicted someone."""

    def __init__(self, model, prompt_length: int):
        self.model, self.prompt_length, self.after = model, prompt_length, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.after is None and self.model.swarm.verifier.convicted:
            self.after = input_ids.shape[1] - self.prompt_length
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_liar_on_10_percent_of_calls_is_caught_within_50_steps(honest, liar):
    liar.stop()  # its records are withdrawn: from here on the rare liar is the one to catch
    with LocalSwarm(["15:30"], dht_initial_peers=honest.initial_peers,
                    extra_peer_args=["--lie", "0.1", "--lie-seed", "1"]) as rare:
        model = client(honest, verify=0.2)
        try:
            inputs = model.tokenizer(PROMPT, return_tensors="pt")
            caught = _Caught(model, inputs["input_ids"].shape[1])
            model.generate(**inputs, max_new_tokens=50, min_new_tokens=50, do_sample=False, stopping_criteria=[caught])
            assert model.swarm.verifier.convicted == {peer_id(model, rare.endpoints[0])}
            assert caught.after is not None and caught.after <= 50
        finally:
            model.swarm.shutdown()
