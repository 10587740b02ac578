"""Verification against peers that lie (`swarm peer --lie`, peer/lying.py): real processes.

Blocks [10, 20) are served by two honest peers and a liar that announces ten times its speed,
so routing sends the work its way; the other blocks by one honest peer each (unverifiable, and
left so). Without verification the liar changes the tokens; with it, the tokens and the loss curve
are the honest ones, the liar is banned and flagged in the DHT, and no honest peer is.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client.apps.cli_status import main as status
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.flags import count_flags, flags_key
from tests.procs import stop

pytestmark = pytest.mark.integration

PROMPT = "A quick brown fox"


@pytest.fixture(scope="module")
def liars(swarm, swarm_procs):
    """The session's swarm ([0, 10), [10, 20), [20, 30)) with [10, 20) served twice more: by an
    honest peer and by a liar on every call; both stop (records withdrawn) with the module."""

    def start(*args: str):
        return swarm_procs.start_peer("--blocks", "10:20", "--decode-threads", "1", *args,
                                      initial_peers=swarm.initial_peers)

    replica, liar = start(), start("--lie", "always")
    replica.wait_ready(), liar.wait_ready()
    return SimpleNamespace(initial_peers=swarm.initial_peers, liar=liar, start=start,
                           replicas=[swarm.endpoints[1], replica.endpoint])


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder).eval()


def client(liars, verify: float, **kwargs):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=liars.initial_peers,
                                                            settings=SwarmSettings(verify=verify), **kwargs)
    if model.swarm.verifier is not None:
        model.swarm.verifier.rng.seed(0)
    return model


def peer_id(model, endpoint: str) -> str:
    return next(r.peer_id for rs in model.swarm.records().values() for r in rs if r.endpoint == endpoint)


def flagged(model) -> dict[str, int]:
    return count_flags(model.swarm.model_id, model.swarm.dht.get(flags_key(model.swarm.model_id), latest=True))


def test_a_liar_on_every_call_is_caught_before_it_changes_a_token(liars, local, capsys):
    trusting = client(liars, verify=0.0)
    try:
        inputs = trusting.tokenizer(PROMPT, return_tensors="pt")
        expected = local.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert not torch.equal(trusting.generate(**inputs, max_new_tokens=4, do_sample=False), expected[:, :-12]), \
            "the liar did not change the first tokens: this test would pass without verification"
    finally:
        trusting.swarm.shutdown()

    model = client(liars, verify=0.2)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), expected)
        liar_id = peer_id(model, liars.liar.endpoint)
        assert model.swarm.verifier.convicted == {liar_id}
        assert set(flagged(model)) == {liar_id}  # flagged for other clients; no honest peer is
    finally:
        model.swarm.shutdown()
    capsys.readouterr()
    assert status(["--initial-peers", *liars.initial_peers]) == 0
    marked = [line for line in capsys.readouterr().out.splitlines() if "FLAGGED" in line]
    assert len(marked) == 1 and liars.liar.endpoint in marked[0]


def test_fine_tuning_through_a_liar_gives_the_honest_loss_curve(liars):
    def losses(verify: float, avoid: list[str] = (), steps: int = 3) -> list[float]:
        torch.manual_seed(0)
        model = client(liars, verify=verify, tuning_mode="lora")
        try:
            for endpoint in avoid:  # fixes the route: through the liar, or never through it
                model.swarm.routes.ban(peer_id(model, endpoint), math.inf)
            batch = model.tokenizer(["The swarm trains a small adapter.", "Peers may lie; clients check."],
                                    return_tensors="pt", padding=True)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            curve = []
            for _ in range(steps):
                loss = model(**batch, labels=batch["input_ids"]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                curve.append(loss.item())
            if verify:
                assert model.swarm.verifier.convicted == {peer_id(model, liars.liar.endpoint)}
            return curve
        finally:
            model.swarm.shutdown()

    honest_curve = losses(0.0, avoid=[liars.liar.endpoint])
    assert losses(0.2) == pytest.approx(honest_curve, rel=1e-4)
    through_the_liar = losses(0.0, avoid=liars.replicas, steps=1)
    assert through_the_liar != pytest.approx(honest_curve[:1], rel=1e-2), "the liar did not change the loss"


class _Caught(StoppingCriteria):
    """Stops generating once the verifier convicted someone, noting after how many tokens."""

    def __init__(self, model, prompt_length: int):
        self.model, self.prompt_length, self.after = model, prompt_length, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.after is None and self.model.swarm.verifier.convicted:
            self.after = input_ids.shape[1] - self.prompt_length
        return torch.full((input_ids.shape[0],), self.after is not None, dtype=torch.bool)


def test_a_liar_on_10_percent_of_calls_is_caught_within_50_steps(liars):
    stop(liars.liar.proc)  # its records are withdrawn: from here on the rare liar is the one to catch
    rare = liars.start("--lie", "0.1", "--lie-seed", "1").wait_ready()
    model = client(liars, verify=0.2)
    try:
        inputs = model.tokenizer(PROMPT, return_tensors="pt")
        caught = _Caught(model, inputs["input_ids"].shape[1])
        model.generate(**inputs, max_new_tokens=50, min_new_tokens=50, do_sample=False, stopping_criteria=[caught])
        assert model.swarm.verifier.convicted == {peer_id(model, rare.endpoint)}
        assert caught.after is not None and caught.after <= 50
    finally:
        model.swarm.shutdown()
