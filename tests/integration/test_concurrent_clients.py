"""Eight client processes generate at once through the real 3-peer swarm, with different prompts
and lengths, two with a LoRA and one with a prefix: every client's greedy tokens are those of
local transformers (PEFT for the adapters) for its own prompt, and the peers really ran
sessions' decode steps together (their Info counters show forward passes of several sessions).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import AutoDistributedModelForCausalLM
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.tuning import PrefixTuning
from tests.integration.peer_info import step_batches
from tests.procs import output, spawn, stop, wait_for_line
from tests.reference import greedy_without_cache

pytestmark = pytest.mark.integration

CLIENTS = [  # prompt, new tokens, adapter
    ("The capital of France is", 12, None),
    ("def fibonacci(n):", 16, None),
    ("Once upon a time, in a land far away, there lived", 10, "lora"),
    ("Water boils at", 14, None),
    ("My favourite book is", 12, "prefix"),
    ("In 1969, the first", 9, None),
    ("The best way to learn a language is to", 15, "lora"),
    ("A quick brown fox", 13, None),
]


def random_adapter(swarm, mode, folder) -> None:
    """An adapter far from its identity start, saved where the clients and PEFT load it."""
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers,
                                                            tuning_mode=mode)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in model.tuning.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    model.save_adapter(folder)
    model.swarm.shutdown()


def expected_tokens(weights, adapters: dict) -> list[list[int]]:
    """Every client's tokens from local transformers (PEFT around it for the adapters), one base
    model for all."""
    tokenizer = AutoTokenizer.from_pretrained(weights)
    base = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    expected = {}
    for adapter in (None, "lora", "prefix"):
        model = base if adapter is None else PeftModel.from_pretrained(base, adapters[adapter]).eval()
        for i, (prompt, tokens, wanted) in enumerate(CLIENTS):
            if wanted != adapter:
                continue
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                if adapter == "prefix":  # PEFT's own generate drops its prefix on transformers 5.24 (tests/reference.py)
                    out = greedy_without_cache(model, inputs["input_ids"], inputs["attention_mask"], tokens)
                else:
                    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            expected[i] = out[0, inputs["input_ids"].shape[1]:].tolist()
        if adapter == "lora":
            base = model.unload()  # the base model as it was, for the prefix (last: PEFT cannot unload it)
    return [expected[i] for i in range(len(CLIENTS))]


def test_eight_clients_at_once_get_their_own_tokens_and_share_passes(swarm, tmp_path):
    weights = resolve_checkpoint(DEFAULT_MODEL).folder
    adapters = {"lora": tmp_path / "lora", "prefix": tmp_path / "prefix"}
    random_adapter(swarm, "lora", adapters["lora"])
    random_adapter(swarm, PrefixTuning(num_virtual_tokens=4), adapters["prefix"])
    go = tmp_path / "go"
    procs = []
    try:
        for prompt, tokens, adapter in CLIENTS:
            args = ["python", "-m", "tests.integration.generating_client", "--peer", swarm.initial_peers[0],
                    "--prompt", prompt, "--tokens", str(tokens), "--go", str(go)]
            procs.append(spawn(args + (["--adapter", str(adapters[adapter])] if adapter else [])))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:  # while the clients start
            expected = expected_tokens(weights, adapters)
        finally:
            torch.set_num_threads(threads)
        for proc in procs:
            wait_for_line(proc, r"^READY$", timeout=180)
        before = step_batches(swarm)
        go.touch()
        for proc in procs:
            proc.wait(timeout=300)
        after = step_batches(swarm)
        for proc, (prompt, _, adapter), want in zip(procs, CLIENTS, expected):
            assert proc.returncode == 0, output(proc)
            got = json.loads(wait_for_line(proc, r"^\[.*\]$", timeout=5).group(0))
            assert got == want, f"{prompt!r} ({adapter or 'no adapter'}): {got} != {want}"
    finally:
        for proc in procs:
            stop(proc)
    shared = [{size: n - old.get(size, 0) for size, n in new.items() if size > 1 and n > old.get(size, 0)}
              for old, new in zip(before, after)]
    assert all(shared), f"passes of several sessions per peer: {shared}"
