"""Per-token decode timing inside transformers' generate.

generate asks its stopping criteria once after every new token, so a criterion that never
stops sees the end of each step. The gaps between consecutive calls are decode steps alone:
no prefill, no session opening, no warm-up, which a tokens / total-time figure would mix in.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class StepClock(StoppingCriteria):
    """Records the time (and optionally `probe()`, e.g. bytes on the wire) after every token."""

    def __init__(self, probe: Callable[[], float] | None = None):
        self.probe = probe
        self.times: list[float] = []
        self.probes: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        if self.probe is not None:
            self.probes.append(self.probe())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_seconds(self) -> list[float]:
        """Duration of each decode step (the first token, produced by the prefill, excluded)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def step_probes(self) -> list[float]:
        """How much `probe()` grew during each decode step."""
        return [b - a for a, b in zip(self.probes, self.probes[1:])]


def decode_seconds_per_token(model, input_ids: torch.Tensor, new_tokens: int, runs: int,
                             **generate_kwargs) -> tuple[float, torch.Tensor]:
    """Median decode step time over `runs` greedy generations of `new_tokens` (after one
    short warm-up), and the tokens of the last run."""
    model.generate(input_ids, max_new_tokens=2, do_sample=False, **generate_kwargs)
    steps = []
    for _ in range(runs):
        clock = StepClock()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), **generate_kwargs)
        steps += clock.step_seconds()
    return statistics.median(steps), out
