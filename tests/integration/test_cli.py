"""The `swarm` command as a person uses it: help texts, generate (one-shot and chat), status."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.procs import LocalSwarm, run
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

pytestmark = pytest.mark.integration


def swarm_cli(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def forked_cli(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """As swarm_cli, the process forked from the test zygote (tests/zygote.py): these tests are
    about what the commands do, the ones above about the interpreter starting them."""
    return run(["python", "-m", "swarm.cli", *args], stdin=stdin, timeout=timeout)


@pytest.mark.parametrize("command", ["dht", "peer", "generate", "status", "finetune", "api", "init", "invite", "revoke"])
def test_every_command_explains_itself(command):
    result = swarm_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"swarm {command}" in result.stdout and "--" in result.stdout


def test_top_level_help_lists_commands():
    result = swarm_cli("--help")
    assert result.returncode == 0
    for command in ("dht", "peer", "generate", "status", "finetune", "api", "init", "invite", "revoke"):
        assert command in result.stdout
    assert swarm_cli("nonsense").returncode == 2


@pytest.fixture(scope="module")
def swarm():
    resolve_checkpoint(DEFAULT_MODEL)
    with LocalSwarm(["0:15", "15:30"]) as running:
        yield running


def test_generate_streams_the_local_greedy_text(swarm):
    folder = resolve_checkpoint(DEFAULT_MODEL).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(local.generate(ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    result = forked_cli("generate", "--initial-peers", swarm.initial_peers[0], "--max-new-tokens", "12",
                       "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip()
    assert "tokens/s" in result.stderr


def test_interactive_chat_keeps_one_session_and_resets(swarm):
    result = forked_cli("generate", "--initial-peers", swarm.initial_peers[0], "--chat", "--max-new-tokens", "8",
                       stdin="Hello!\nWhat is 2+2?\n/reset\nHi again\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant>") == 3
    assert "(conversation reset)" in result.stderr
    positions = [int(line.split(",")[1].split()[0]) for line in result.stderr.splitlines() if "tokens in session" in line]
    assert len(positions) == 3 and positions[1] > positions[0] and positions[2] < positions[1]


def test_status_shows_coverage(swarm):
    result = forked_cli("status", "--initial-peers", swarm.initial_peers[0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blocks   0:15" in result.stdout and "blocks  15:30" in result.stdout and "all blocks covered" in result.stdout
