"""Every model family through a real swarm: for Mixtral, Gemma 3, Falcon, BLOOM and Phi-3, a
tiny random model saved as a Hugging Face folder is served by two `swarm peer` processes
(all families' peers start at once, against the session's DHT) and driven by the real
client: greedy tokens equal transformers' `generate`, LoRA gradients equal PEFT's.

(Named apart from tests/swarm/test_families.py: without __init__.py files, pytest cannot
collect two test modules of one name.)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import hivemind
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarm.models import get_family
from tests.swarm.test_models import prompt_ids, tiny_model

pytestmark = pytest.mark.integration

# Family -> where its two peers split the blocks (Gemma's spans each hold a sliding and a full layer).
SPLITS = {"mixtral": "0:1 1:3", "gemma3_text": "0:2 2:4", "falcon": "0:2 2:3", "bloom": "0:1 1:3", "phi3": "0:2 2:3"}
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def folders(swarm_procs, tmp_path_factory) -> dict[str, Path]:
    """Saves every family's tiny model and starts all their peers in parallel (one thread each:
    ten processes share two cores), then waits for all of them."""
    folders, peers = {}, []
    for name, splits in SPLITS.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        tiny_model(name).save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
        for blocks in splits.split():
            peers.append(swarm_procs.start_peer("--model", str(folder), "--blocks", blocks, "--threads", "1"))
    for peer in peers:
        peer.wait_ready()
    return folders


@pytest.fixture(scope="module")
def dht(dht_maddr: str) -> Iterator[hivemind.DHT]:
    """One DHT client for all the module's distributed models (each would start its own otherwise)."""
    node = hivemind.DHT(initial_peers=[dht_maddr], client_mode=True, start=True)
    yield node
    node.shutdown()


@pytest.fixture(scope="module", params=list(SPLITS))
def family(request, folders, dht, dht_maddr):
    """The family's distributed model with a LoRA on its default targets (B = 0 at first, so its
    outputs are the base model's), and the same model as transformers loads it."""
    name = request.param
    folder = folders[name]
    local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    targets = list(get_family(local.config).default_lora_targets)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(folder), initial_peers=[dht_maddr], dht=dht, tuning_mode="lora", lora_rank=RANK, lora_alpha=ALPHA,
        lora_targets=targets)
    return name, model, local, targets


def greedy(model, ids: torch.Tensor) -> list[list[int]]:
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                          min_new_tokens=16, pad_token_id=0).tolist()


def test_greedy_matches_local(family):
    name, model, local, _ = family
    ids = prompt_ids()
    assert greedy(model, ids) == greedy(local, ids), name


def test_lora_grads_match_peft(family):
    name, model, local, targets = family
    ids = prompt_ids(length=12)
    adapter = model.tuning.adapters[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter.tensors().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)

    peft_model = get_peft_model(copy.deepcopy(local), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=[t.rsplit(".", 1)[-1] for t in targets], lora_dropout=0.0))
    base, layers_prefix = peft_model.base_model.model, model.family.layers_prefix
    peft_params = {}
    for tensor_name, param in adapter.tensors().items():
        block, rest = tensor_name.split(".", 1)
        path, part = rest.rsplit(".", 1)
        weight = getattr(base.get_submodule(f"{layers_prefix}.{block}.{path}"), part)["default"].weight
        with torch.no_grad():
            weight.copy_(param)
        peft_params[tensor_name] = weight
    expected_loss = peft_model(input_ids=ids, labels=ids).loss
    expected = dict(zip(peft_params, torch.autograd.grad(expected_loss, list(peft_params.values()))))

    loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    actual = adapter.tensors()
    assert set(actual) == set(expected), name
    for tensor_name, expected_grad in expected.items():
        assert expected_grad.abs().max() > 0, tensor_name
        torch.testing.assert_close(actual[tensor_name].grad, expected_grad, rtol=1e-3,
                                   atol=1e-4 * expected_grad.abs().max().item(), msg=f"{name} {tensor_name}")
