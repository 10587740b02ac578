"""Code written for Petals runs on swarmlm: the lecture's fine-tuning snippet, as written,
through three real peers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from swarm.checkpoint import DEFAULT_MODEL

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "petals_snippet.py"



def test_lecture_snippet_memorises_the_sentence(swarm, capsys):
    spec = importlib.util.spec_from_file_location("petals_snippet", EXAMPLE)
    snippet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snippet)
    generated = snippet.run(swarm.initial_peers)
    printed = capsys.readouterr().out
    last_loss = float(printed.split("loss[99] = ")[1].split()[0])
    assert last_loss < 0.05
    assert "generated: A quick brown fox did not jump over the lazy dog" in printed
    assert generated == "A quick brown fox did not jump over the lazy dog"


def test_prompt_tuning_alone_lowers_the_loss(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers,
                                                            tuning_mode="ptune", pre_seq_len=8)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["tuning.prompts"]
    ids = model.tokenizer("A quick brown fox did not jump over the lazy dog", return_tensors="pt")["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.swarm.shutdown()
