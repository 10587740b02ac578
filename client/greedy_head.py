"""Greedy decoding's next token from an int8 copy of the LM head, exact.

The client's LM head is its largest cost per token: for the default model a float32 matrix of
49152 x 576 (113 MB) read in full for every token, 12 ms on one core of this box; 8 clients on
one machine spent most of their CPU there (perf, 2026-12-03). Greedy decoding needs only the
largest logit, so the head is first read in int8 (a quarter of the bytes, with
`torch.ops.aten._weight_int8pack_mm`: 5.4 ms), with a bound on each logit's error. Only the
tokens whose bound still lets them be the largest (9 in the median, 44 at p90, at most 346 of
49152 over 478 steps of the default model) are then computed exactly in float32, from the float
weights: 6.4-7 ms a step in all. The token chosen is the one the full float32 head chooses.

The bound, per vocabulary row i, for the head's input h (after the final norm): the row is
stored as codes round(W_i / s_i) with s_i >= max|W_i| / 127 (a bfloat16 number, which the kernel
multiplies by exactly), so each weight is off by at most s_i / 2; h enters the kernel in
bfloat16 (each off by at most 2^-9 |h_k|, times a code of at most 127 s_i); the kernel's float32
sums add far less, and its bfloat16 output is off by at most 2^-9 of itself. Hence
|approx_i - exact_i| <= s_i |h|_1 (1/2 + 127 / 2^9 + slack) + |approx_i| / 2^7. A token whose
upper bound is below the best lower bound cannot win.

Where this is used (client/model.py): only inside `generate`, only when transformers decodes
greedily, returns no scores or logits, and runs no logits processor but those that only mask
tokens (`min_new_tokens`, `suppress_tokens`, `bad_words_ids`, `no_repeat_ngram_size`); only for
a float32 head on the CPU, with gradients off, and no soft-capping. Anywhere else the full head
runs as before. The vector handed back is exact for the candidates and within its bound
elsewhere, every approximate entry below the winner, so its argmax is the full head's. Masking a
token other than the winner keeps that so; when a processor masked the winner, the last
processor (`ExactArgmax`) gives that row the full head's logits.

The int8 copy is built at the first such step (a quarter of the head's memory), checked once
against the float head on random inputs, and rebuilt when the weights change in place (an
optimizer step, load_state_dict: both move the tensor's version counter; writes through `.data`
do not). If the kernel is missing or fails that check, the full head runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.generation import (LogitsProcessor, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                                     NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                     SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor)

logger = logging.getLogger(__name__)

# Per-row error per unit of s_i |h|_1: weight rounding (1/2) + bfloat16 input (127 / 2^9 = 0.248)
# + float32 sums (576 terms: 0.005), rounded up.
WEIGHT_BOUND = 0.8
OUTPUT_BOUND = 2.0**-7  # the kernel's bfloat16 output, twice over
# Above this many candidates (a flat distribution) the full head is cheaper than the gather.
MAX_CANDIDATES_RATIO = 1 / 16
# torch's kernel reads the hidden size in blocks: measured with torch 2.13, sizes that are not a
# multiple of 16 give wrong sums (8, 24, 40) or crash the process (7, 100). Every released LLM's
# hidden size is a multiple of 64.
HIDDEN_MULTIPLE = 64


class ScreenedHead:
    """The int8 copy of one float32 LM head weight (vocab, hidden) on the CPU."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.version = weight._version
        weight = weight.detach()
        # Scales rounded up to bfloat16, which the kernel multiplies by: exactly these, and no
        # weight's code leaves [-127, 127].
        scales = (weight.abs().amax(dim=1) / 127 * (1 + 2.0**-7)).clamp_min(1e-30)
        self.bf16_scales = scales.to(torch.bfloat16)
        self.scales = self.bf16_scales.float()
        self.codes = torch.round(weight / self.scales[:, None]).clamp_(-127, 127).to(torch.int8)
        self.bound_scales = self.scales * WEIGHT_BOUND

    def current(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight._version == self.version

    def estimate(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, vocab): each row's logits from the int8 copy."""
        return torch.ops.aten._weight_int8pack_mm(hidden.to(torch.bfloat16), self.codes, self.bf16_scales).float()

    def bounds(self, hidden: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        """How far each of `approx` may be from the float head's logit (the module docstring)."""
        return self.bound_scales * hidden.abs().sum(dim=1, keepdim=True) + approx.abs() * OUTPUT_BOUND

    def pick(self, hidden: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, tuple] | None:
        """`approx` (rows, vocab), in place, with the exact float32 logit of every token that may
        be the largest of its row, and where the largest are (rows, tokens); None where the full
        head is cheaper (too many tokens are close)."""
        # A token can win only if its upper bound reaches the best lower bound. In one fused pass,
        # the bound with its output term at the row's largest |approx| keeps a superset of those
        # (a few dozen); only these get their own bounds.
        l1 = hidden.abs().sum(dim=1, keepdim=True)
        (top, at), bottom = approx.max(dim=1, keepdim=True), approx.amin(dim=1, keepdim=True)
        largest = torch.maximum(top.abs(), bottom.abs()) * OUTPUT_BOUND
        top_lower = top - self.bound_scales[at] * l1 - top.abs() * OUTPUT_BOUND
        reach = torch.addcmul(approx, self.bound_scales, l1)
        rows, tokens = (reach >= top_lower - largest).nonzero(as_tuple=True)
        near = approx[rows, tokens]
        bound = self.bound_scales[tokens] * l1[rows, 0] + near.abs() * OUTPUT_BOUND
        best_lower = torch.full_like(top[:, 0], -torch.inf).scatter_reduce_(0, rows, near - bound, "amax")
        keep = near + bound >= best_lower[rows]
        rows, tokens = rows[keep], tokens[keep]
        if tokens.numel() > MAX_CANDIDATES_RATIO * approx.numel():
            return None
        exact = (self.weight.detach()[tokens] * hidden[rows]).sum(dim=1)
        approx[rows, tokens] = exact
        best = torch.full_like(top[:, 0], -torch.inf).scatter_reduce_(0, rows, exact, "amax")
        wins = exact == best[rows]
        return approx, (rows[wins], tokens[wins])

    def check(self, samples: int = 4) -> bool:
        """Whether the kernel keeps to the bound here: random inputs, against the float head."""
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(samples, self.codes.shape[1], generator=generator) * 3
        hidden[:, :4] *= 30  # a few outlier channels, as real hidden states have
        approx = self.estimate(hidden)
        exact = F.linear(hidden, self.weight.detach())
        return bool(((approx - exact).abs() <= self.bounds(hidden, approx) / 2).all())


class GreedySteps:
    """One greedy `generate` call's screening: the model's forward hands each step's hidden
    states to `logits`; `ExactArgmax`, the last logits processor, then mends the step if an
    earlier processor masked its winner. `cache` (the model's) keeps the int8 copy between calls."""

    def __init__(self, cache: dict) -> None:
        self.cache = cache
        self.last: tuple | None = None  # (the copy, hidden states, logits, where each row's winners are)

    def logits(self, head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor | None:
        """Screened logits for `hidden` (rows, 1, hidden size) after the final norm (see the module
        docstring), or None where the full head must run."""
        self.last = None
        screened = _screened_head(head, self.cache)
        if screened is None or hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.dtype != torch.float32:
            return None  # several positions a row (assisted decoding): the processor could not mend them
        flat = hidden[:, 0]
        if not bool(torch.isfinite(flat).all()):
            return None
        picked = screened.pick(flat, screened.estimate(flat))
        if picked is None:
            return None
        self.last = (screened, flat, *picked)
        return picked[0][:, None]

    def mend(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores`: the last step's logits after the masking processors. Masking a token that
        is not a row's winner leaves the winner the largest; where a winner was masked, its row's
        tokens left get the full head's logits (rare: EOS held back by `min_new_tokens`, say)."""
        last, self.last = self.last, None
        if last is None or last[2].shape != scores.shape:
            return scores
        screened, flat, picked, winners = last
        if bool((scores[winners] == picked[winners]).all()):
            return scores
        allowed = scores == picked  # the processors allowed here only set masked tokens to -inf
        return torch.where(allowed, F.linear(flat, screened.weight.detach()), scores)


# The logits processors that only set some tokens' scores to -inf: with these before it,
# `ExactArgmax` keeps greedy decoding exact (`min_new_tokens`, `suppress_tokens`, `bad_words_ids`...).
MASKING_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                      NoRepeatNGramLogitsProcessor, SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor)


class EosHeldBack(LogitsProcessor):
    """What `MinLengthLogitsProcessor` (`skip` 0) and `MinNewTokensLengthLogitsProcessor` do, in
    place: EOS scores -inf while a row holds fewer than `min_length` tokens after the first
    `skip`. transformers' own rebuild a vocabulary-sized mask and copy the scores at every step,
    also once the length is reached: 0.44 ms each a step for the default model, on a screened
    step of about 6. In place is safe here: generate hands the processors a copy of the logits,
    and a screened generate keeps no scores."""

    def __init__(self, min_length: int, skip: int, eos_token_id: torch.Tensor) -> None:
        self.min_length, self.skip = min_length, skip
        self.eos = torch.as_tensor(eos_token_id).reshape(-1)
        self._columns: tuple | None = None  # (vocab size, device, the EOS ids inside it), once a generate

    @classmethod
    def replacing(cls, processor: LogitsProcessor) -> LogitsProcessor:
        """The in-place twin of a min-length processor; any other processor as it is."""
        if type(processor) is MinLengthLogitsProcessor:
            return cls(processor.min_length, 0, processor.eos_token_id)
        if type(processor) is MinNewTokensLengthLogitsProcessor:
            return cls(processor.min_new_tokens, processor.prompt_length_to_skip, processor.eos_token_id)
        return processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.skip < self.min_length:
            scores[:, self._eos_columns(scores)] = -torch.inf
        return scores

    def _eos_columns(self, scores: torch.Tensor) -> torch.Tensor:
        vocab, device = scores.shape[-1], scores.device
        if self._columns is None or self._columns[:2] != (vocab, device):
            eos = self.eos.to(device)
            self._columns = (vocab, device, eos[(eos >= 0) & (eos < vocab)])  # as isin: other ids mask nothing
        return self._columns[2]


class ExactArgmax(LogitsProcessor):
    """The last processor of a screened greedy generate (see `GreedySteps.mend`)."""

    def __init__(self, steps: GreedySteps) -> None:
        self.steps = steps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.steps.mend(scores)


def _screened_head(head: torch.nn.Linear, cache: dict) -> ScreenedHead | None:
    """The int8 copy of `head` kept in `cache`, (re)built when missing or stale; None where the
    head cannot be screened (or torch's kernel is missing or breaks the bound here)."""
    weight = head.weight
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or head.bias is not None
            or torch.is_grad_enabled() or weight.shape[1] % HIDDEN_MULTIPLE):
        return None
    screened = cache.get("head")
    if screened is not None and screened.current(weight):
        return screened
    cache.pop("head", None)
    if cache.get("broken"):
        return None
    try:
        screened = ScreenedHead(weight)
        usable = screened.check()
    except (RuntimeError, AttributeError, NotImplementedError) as error:  # no such kernel in this torch
        logger.debug("int8 head screening unavailable: %s", error)
        usable = False
    if not usable:
        cache["broken"] = True
        return None
    cache["head"] = screened
    return screened
