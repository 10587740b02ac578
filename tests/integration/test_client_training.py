"""Training through a real swarm (DHT + three peers): gradients of every tuning mode equal
the same step computed locally by transformers (with peft for LoRA), Adam lowers the loss,
and an exported LoRA loads into peft with the same logits and tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from client import AutoDistributedModelForCausalLM
from client.transport import PeerConnection
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

pytestmark = pytest.mark.integration

TEXT = "A quick brown fox did not jump over the lazy dog"
PREFIX = 4


@pytest.fixture(scope="module")
def folder():
    return resolve_checkpoint(DEFAULT_MODEL).folder


def distributed(swarm, **kwargs):
    torch.manual_seed(0)
    return AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers, **kwargs)


def local_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def token_ids(model):
    return model.tokenizer(TEXT, return_tensors="pt")["input_ids"]


def local_loss_with_prompts(local, ids, prompts, deep_prompts=None):
    """The reference for soft/deep prompts: prompts prepended to the embeddings, deep prompts
    added to the prompt positions before every decoder layer, prompt positions cut from the logits."""
    handles = []
    if deep_prompts is not None:
        for i, layer in enumerate(local.model.layers):
            def add(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :PREFIX] + deep_prompts[i], hidden[:, PREFIX:]], dim=1)
                return ((hidden,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        embeds = torch.cat([prompts.unsqueeze(0), local.model.embed_tokens(ids)], dim=1)
        logits = local(inputs_embeds=embeds).logits[:, PREFIX:]
        return ForCausalLMLoss(logits, ids, vocab_size=local.config.vocab_size)
    finally:
        for handle in handles:
            handle.remove()


def assert_grads_close(ours: torch.Tensor, theirs: torch.Tensor):
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * scale)


def test_default_mode_trains_client_embeddings_norm_and_head(swarm, folder):
    model = distributed(swarm)
    ids = token_ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    local = local_model(folder)
    local(input_ids=ids, labels=ids).loss.backward()
    assert_grads_close(model.parts.embed_tokens.weight.grad, local.model.embed_tokens.weight.grad)
    assert_grads_close(model.parts.norm.weight.grad, local.model.norm.weight.grad)
    model.swarm.shutdown()


@pytest.mark.compat
def test_ptune_grads_match_local(swarm, folder):
    model = distributed(swarm, tuning_mode="ptune", pre_seq_len=PREFIX)
    ids = token_ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    local = local_model(folder).requires_grad_(False)
    prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
    local_loss_with_prompts(local, ids, prompts).backward()
    assert_grads_close(model.tuning.prompts.grad, prompts.grad)
    model.swarm.shutdown()


def backward_counts(swarm) -> list[tuple[int, int]]:
    """Per peer: Backward calls it answered from the kept Forward graph, and by recomputing."""
    infos = [PeerConnection.to(endpoint).info() for endpoint in swarm.endpoints]
    return [(i.backwards_kept, i.backwards_recomputed) for i in infos]


def test_deep_ptune_grads_match_local(swarm, folder):
    """Also: each peer answers the Backward from the graph its Forward kept, with no recomputation."""
    model = distributed(swarm, tuning_mode="deep_ptune", pre_seq_len=PREFIX)
    with torch.no_grad():
        model.tuning.deep_prompts.normal_(std=0.05)  # non-zero, so the reference path is exercised
    ids = token_ids(model)
    before = backward_counts(swarm)
    model(input_ids=ids, labels=ids).loss.backward()
    assert [(k - k0, r - r0) for (k, r), (k0, r0) in zip(backward_counts(swarm), before)] == [(1, 0)] * 3
    local = local_model(folder).requires_grad_(False)
    prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
    deep = model.tuning.deep_prompts.detach()[:, 0].clone().requires_grad_(True)
    local_loss_with_prompts(local, ids, prompts, deep).backward()
    assert_grads_close(model.tuning.prompts.grad, prompts.grad)
    assert_grads_close(model.tuning.deep_prompts.grad[:, 0], deep.grad)
    model.swarm.shutdown()


def lora_pair(swarm, folder):
    """A distributed model with a random non-zero LoRA, and peft's local model with the same."""
    model = distributed(swarm, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.tuning.adapters[0].params.items():
            param.normal_(std=0.05)
    peft_model = get_peft_model(local_model(folder), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ours = model.tuning.adapters[0].tensors()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                block = name.split("layers.")[1].split(".")[0]
                rest = name.split(f"layers.{block}.")[1].replace(".default.weight", "")
                param.copy_(ours[f"{block}.{rest}"])
    return model, peft_model


@pytest.mark.compat
def test_lora_grads_match_peft(swarm, folder):
    model, peft_model = lora_pair(swarm, folder)
    ids = token_ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    ours = {name: p.grad for name, p in model.tuning.adapters[0].tensors().items()}
    checked = 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            block = name.split("layers.")[1].split(".")[0]
            rest = name.split(f"layers.{block}.")[1].replace(".default.weight", "")
            assert_grads_close(ours[f"{block}.{rest}"], param.grad)
            checked += 1
    assert checked == 30 * 2 * 2
    model.swarm.shutdown()


@pytest.mark.parametrize("mode", [None, "ptune", "deep_ptune", "lora"])
def test_adam_halves_the_loss(swarm, mode):
    model = distributed(swarm, tuning_mode=mode, pre_seq_len=PREFIX)
    ids = token_ids(model)[:, :8]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3 if mode is None else 1e-2)
    model.train()
    losses = []
    # Within 30 steps; stopped once there (each step is a Forward and a Backward through 3 peers).
    while len(losses) < 30 and not (losses and losses[-1] < losses[0] / 2):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
    model.swarm.shutdown()


@pytest.mark.compat
def test_exported_lora_loads_into_peft_with_same_logits_and_tokens(swarm, folder, tmp_path):
    model, _ = lora_pair(swarm, folder)
    model.save_adapter(tmp_path)
    reference = PeftModel.from_pretrained(local_model(folder), tmp_path).eval()
    inputs = model.tokenizer("A quick brown fox", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-4, rtol=1e-4)
    ours = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    theirs = reference.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    reloaded = distributed(swarm, adapter=tmp_path)
    assert reloaded.generate(**inputs, max_new_tokens=16, do_sample=False).tolist() == ours.tolist()
    model.swarm.shutdown()
    reloaded.swarm.shutdown()


def test_concurrent_clients_with_different_adapters_do_not_mix(swarm, folder):
    """Two clients with different LoRAs hammer the same peers at once; each gets exactly
    what it gets alone (peers keep no adapter state between requests)."""
    first, _ = lora_pair(swarm, folder)
    second, _ = lora_pair(swarm, folder)
    with torch.no_grad():
        for param in second.tuning.parameters():
            param.mul_(-3.0)
    ids = token_ids(first)
    with torch.no_grad():
        alone = [m(input_ids=ids).logits for m in (first, second)]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(index, model):
        with torch.no_grad():
            for _ in range(4):
                results[index].append(model(input_ids=ids).logits)

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    for index in (0, 1):
        for logits in results[index]:
            torch.testing.assert_close(logits, alone[index], atol=1e-5, rtol=1e-5)
    first.swarm.shutdown()
    second.swarm.shutdown()


def test_lm_head_trains_only_when_asked_and_round_trips(swarm, tmp_path):
    plain = distributed(swarm, tuning_mode="ptune", pre_seq_len=PREFIX)
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == ["tuning.prompts"]
    model = distributed(swarm, tuning_mode="ptune", pre_seq_len=PREFIX, train_lm_head=True)
    # SmolLM2 ties its head to the embeddings, so the shared weight is listed under its first name.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"tuning.prompts", "parts.embed_tokens.weight"}
    ids = token_ids(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_adapter(tmp_path)
    reloaded = distributed(swarm, adapter=tmp_path)
    assert reloaded.train_lm_head
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for m in (plain, model, reloaded):
        m.swarm.shutdown()
