"""Peers die; users keep their output. Real processes, real `kill -9`."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria

from client import AutoDistributedModelForCausalLM, SwarmSettings
from tests.procs import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def replicated_swarm():
    """Blocks [15, 30) served twice."""
    resolve_checkpoint(DEFAULT_MODEL)
    with LocalSwarm(["0:15", "15:30", "15:30"]) as running:
        yield running


def kill_9(swarm: LocalSwarm, endpoint: str) -> None:
    """SIGKILL the peer at `endpoint` and its helpers, as if its machine went away."""
    os.killpg(swarm.peer_procs[swarm.endpoints.index(endpoint)].pid, signal.SIGKILL)


def hang(swarm: LocalSwarm, endpoint: str) -> None:
    """SIGSTOP the peer at `endpoint`: alive, connected, and silent."""
    os.kill(swarm.peer_procs[swarm.endpoints.index(endpoint)].pid, signal.SIGSTOP)


class BreakPeerInUse(StoppingCriteria):
    """Midway through generation, breaks the peer serving [15, 30) for the session."""

    def __init__(self, swarm, session, after_tokens: int, how):
        self.swarm, self.session, self.after_tokens, self.how, self.broken = swarm, session, after_tokens, how, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.broken is None and input_ids.shape[1] >= self.after_tokens:
            self.broken = self.session.endpoints[-1]
            self.how(self.swarm, self.broken)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("how", [pytest.param(kill_9, marks=pytest.mark.compat), hang], ids=["kill -9", "SIGSTOP"])
def test_generation_survives_the_peer_in_use_dying_or_hanging(replicated_swarm, how):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=replicated_swarm.initial_peers,
                                                            settings=SwarmSettings(request_timeout=3.0))
    local = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder).eval()
    inputs = model.tokenizer("A quick brown fox", return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=24, do_sample=False)
    with model.inference_session(max_length=64) as session:
        breaker = BreakPeerInUse(replicated_swarm, session, inputs["input_ids"].shape[1] + 8, how)
        ours = model.generate(**inputs, max_new_tokens=24, do_sample=False, session=session,
                              stopping_criteria=[breaker])
        assert breaker.broken is not None and breaker.broken not in session.endpoints
    assert ours.tolist() == expected.tolist()
    model.swarm.shutdown()
    if how is hang:  # a stopped process cannot handle SIGTERM: end it here, not in the fixture's grace period
        kill_9(replicated_swarm, breaker.broken)


def test_training_step_survives_a_dead_peer(replicated_swarm, caplog):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=replicated_swarm.initial_peers,
                                                            tuning_mode="ptune", pre_seq_len=4)
    ids = model.tokenizer("A quick brown fox did not jump over the lazy dog", return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    expected = model.tuning.prompts.grad.clone()
    model.tuning.prompts.grad = None

    dead, alive = replicated_swarm.endpoints[1], replicated_swarm.endpoints[2]
    kill_9(replicated_swarm, dead)
    model.swarm.routes.rtt[alive] = 1e6  # routing would pick the dead replica first: its failure must be survived
    with caplog.at_level("WARNING", logger="client.remote_swarm"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert dead in caplog.text and "retrying on other peers" in caplog.text
    torch.testing.assert_close(model.tuning.prompts.grad, expected, rtol=1e-5, atol=1e-7)
    model.swarm.shutdown()
