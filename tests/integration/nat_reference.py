"""What tests/integration/test_nat.py and its client processes share: the prompt, the LoRA
settings and its seeded weights, and the same computed locally by transformers and PEFT."""

from __future__ import annotations

import copy

import torch

RANK, ALPHA = 4, 8.0
LORA = {"tuning_mode": "lora", "lora_rank": RANK, "lora_alpha": ALPHA}


def prompt() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 8, 99, 23, 61, 7]])


def seeded_lora(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fills the adapter's tensors with fixed random values (B = 0 would hide a wrong gradient)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sorted(tensors):
            tensors[name].copy_(torch.randn(tensors[name].shape, generator=generator) * 0.1)
    return tensors


def local_greedy(local, tokens: int) -> list[int]:
    ids = prompt()
    return local.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                          min_new_tokens=tokens, pad_token_id=0)[0].tolist()


def local_lora_grads(local, tensor_names: list[str], targets: list[str], layers_prefix: str):
    """PEFT's loss and gradients for the LoRA `seeded_lora` makes, by our tensor names."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(local), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=sorted({t.rsplit(".", 1)[-1] for t in targets}), lora_dropout=0.0))
    base = peft_model.base_model.model
    params = {}
    for name in tensor_names:
        block, rest = name.split(".", 1)
        path, part = rest.rsplit(".", 1)
        params[name] = getattr(base.get_submodule(f"{layers_prefix}.{block}.{path}"), part)["default"].weight
    seeded_lora({n: p.data for n, p in params.items()})
    ids = prompt()
    loss = peft_model(input_ids=ids, labels=ids).loss
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
