"""How fast a loaded span serves one generating client: the tokens/s a peer announces."""

from __future__ import annotations

import time

import torch

from swarm.blocks import BlockSpan


def measure_throughput(span: BlockSpan, max_seconds: float = 1.0, max_steps: int = 16) -> float:
    """Tokens/s of single-token inference steps at batch 1: what one generating client gets."""
    state = span.start_inference(batch_size=1, max_length=max_steps + 1)
    generator = torch.Generator().manual_seed(0)
    token = torch.randn(1, 1, span.hidden_size, generator=generator).to(span.device, span.dtype)
    span.inference_step(state, token)  # warm-up: first-call allocations, kernel selection
    _synchronize(span.device)
    started, steps = time.perf_counter(), 0
    while steps < max_steps and time.perf_counter() - started < max_seconds:
        span.inference_step(state, token)
        steps += 1
    _synchronize(span.device)
    return steps / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
