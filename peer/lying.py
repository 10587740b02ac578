"""A peer that lies on purpose, for testing verification (client/verify.py) only.

`swarm peer --lie SPEC` (hidden from --help) perturbs what the peer returns: the outputs of
Forward calls and inference steps, and the input gradients of Backward calls. SPEC says when:

  always     every call
  0.1        each call with this probability (seeded by --lie-seed, so a run repeats)
  after:N    every call after the first N

A lie adds noise of `scale` times each token's root-mean-square to its hidden states: enough
to change greedy tokens, so a test that is not protected by verification fails. The peer also
announces ten times its measured throughput, as a liar drawing traffic to itself would, so
clients route through it. An honest peer has `lie=None` and pays one `is None` test per call.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^(always|after:(\d+)|(0(\.\d+)?|1(\.0+)?))$")


def check_lie_spec(spec: str) -> str:
    """`spec` if it is one of the forms above; else ValueError saying what is expected."""
    if not _SPEC.match(spec):
        raise ValueError(f"--lie {spec!r}: expected 'always', a probability like 0.1, or 'after:N'")
    return spec


@dataclass
class Liar:
    spec: str
    scale: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_lie_spec(self.spec)
        self.calls = self.lies = 0
        import torch  # here, not above: `swarm peer --help` checks a SPEC without loading torch

        self._rng = random.Random(self.seed)
        self._noise = torch.Generator().manual_seed(self.seed)

    def _lies_now(self) -> bool:
        self.calls += 1
        if self.spec == "always":
            return True
        if self.spec.startswith("after:"):
            return self.calls > int(self.spec.split(":", 1)[1])
        return self._rng.random() < float(self.spec)

    def distort(self, hidden: "torch.Tensor") -> "torch.Tensor":
        """`hidden`, perturbed on the calls SPEC picks (counted per call)."""
        if not self._lies_now():
            return hidden
        self.lies += 1
        logger.debug("lying on call %d (%d lies so far)", self.calls, self.lies)
        import torch

        rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(hidden.shape, generator=self._noise, dtype=torch.float32)
        return (hidden.float() + self.scale * rms * noise).to(hidden.dtype)
