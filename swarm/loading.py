"""Building a span of blocks, or the client's parts, from a checkpoint without
materialising anything else: modules are built on the meta device and only the tensors
they own are read from safetensors."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .blocks import BlockSpan
from .checkpoint import Checkpoint
from .models import ClientParts, get_family

logger = logging.getLogger(__name__)


class SpanError(ValueError):
    pass


def check_span(start: int, end: int, num_blocks: int) -> None:
    if not (0 <= start < end <= num_blocks):
        raise SpanError(
            f"block span [{start}, {end}) is not inside [0, {num_blocks}): the model has {num_blocks} blocks, "
            f"so pick 0 <= start < end <= {num_blocks}"
        )


def load_span(checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> BlockSpan:
    """Blocks [start, end) of the checkpoint's model, reading only their tensors."""
    family = get_family(checkpoint.config)
    check_span(start, end, family.num_blocks)
    span_config = family.span_config(start, end)
    with torch.device("meta"):
        layers = family.build_layers(span_config)
    # Name in the span -> checkpoint tensor(s): one to one, except where the family's
    # checkpoints use another layout than its layers (Mixtral's per-expert matrices).
    sources = family.checkpoint_sources(layers, start, checkpoint.weight_files)
    keys = sorted({key for source in sources.values() for key in source.keys})
    tensors = checkpoint.read_tensors(keys)
    state = {name: source.assemble(tensors).to(dtype) for name, source in sources.items()}
    del tensors
    layers.load_state_dict(state, assign=True, strict=True)
    _fail_on_meta(layers, f"blocks [{start}, {end})")
    layers.to(device)
    rotary = family.build_rotary(span_config).to(device)
    span = BlockSpan(family, span_config, start, end, layers, rotary)
    span.requires_grad_(False)
    span.eval()
    span.fingerprint = checkpoint.tensors_fingerprint(keys)
    return span


def load_client_parts(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> ClientParts:
    """Token embeddings, final norm and LM head (tied to the embeddings when the config says so)."""
    family = get_family(checkpoint.config)
    with torch.device("meta"):
        parts = family.build_client_parts()
    keys = family.client_keys()
    tensors = checkpoint.read_tensors(list(keys))
    state = {keys[name]: tensor.to(dtype) for name, tensor in tensors.items()}
    tied = "lm_head.weight" not in state
    missing, unexpected = parts.load_state_dict(state, assign=True, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise SpanError(f"client parts: missing {missing}, unexpected {unexpected}")
    if tied:
        parts.lm_head.weight = parts.embed_tokens.weight
    _fail_on_meta(parts, "client parts")
    return parts.to(device)


def _fail_on_meta(module: nn.Module, what: str) -> None:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise SpanError(f"{what}: tensors {left} were not in the checkpoint")
