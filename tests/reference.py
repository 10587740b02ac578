"""Local references that lean on as little of transformers' generate as possible."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_without_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens by running the whole sequence through `model.forward` each step.

    For PEFT's prefix tuning: PEFT 0.21 hands its prefix to the model as `past_key_values`,
    which transformers 5.24's generate drops in favour of its own `cache` ("Both
    `past_key_values` and `cache` are set"), so PEFT's own generate ignores the prefix there.
    Its forward is still right, and a cache-free loop over it is the same greedy decode."""
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them from the mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        step = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, step], dim=1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    return ids
