"""Greedy decoding's next token from an int8 copy of the LM head, exact.

The client's LM head is its largest cost per token: for the default model a float32 matrix of
49152 x 576 (113 MB) read in full for every token, 12 ms on one core of this box; 8 clients on
one machine spent most of their CPU there (perf, 2026-12-03). Greedy decoding needs only the
largest logit, so the head is first read in int8 (`client/head_estimates.py`: 0.9 ms with
fbgemm's int8 kernel, 3.9 with bfloat16 input where fbgemm is missing), with a rigorous bound on
each logit's error. Only the tokens whose bound still lets them be the largest (3 in the median,
10 at p90 of 351 steps of the default model with fbgemm; 7 and 30 with bfloat16 input) are then
computed exactly in float32, from the float weights. The token chosen is the one the full
float32 head chooses: a token whose upper bound is below the best lower bound cannot win.

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
do not). If no kernel is there or passes that check, the full head runs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.generation import (LogitsProcessor, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                                     NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                     SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor)

from . import head_estimates

logger = logging.getLogger(__name__)

# Above this many candidates (a flat distribution) the full head is cheaper than the gather.
MAX_CANDIDATES_RATIO = 1 / 16


class ScreenedHead:
    """An int8 copy of one float32 LM head weight (vocab, hidden) on the CPU: the first of
    `head_estimates.ESTIMATES` that this torch has and that keeps to its bound here."""

    def __init__(self, weight: torch.Tensor, estimate: type) -> None:
        self.weight = weight
        self.version = weight._version
        self.estimates = estimate(weight.detach())

    @classmethod
    def first_usable(cls, weight: torch.Tensor) -> ScreenedHead | None:
        for estimate in head_estimates.ESTIMATES:
            try:
                screened = cls(weight, estimate)
                if screened.check():
                    return screened
                logger.debug("%s breaks its bound here", estimate.__name__)
            except (RuntimeError, AttributeError, NotImplementedError) as error:  # no such kernel here
                logger.debug("%s unavailable: %s", estimate.__name__, error)
        return None

    def current(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight._version == self.version

    def estimate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, vocab) twice: each row's logits from the int8 copy, and how far each may be
        from the float head's."""
        return self.estimates.estimate(hidden)

    def pick(self, hidden: torch.Tensor, approx: torch.Tensor,
             bound: torch.Tensor) -> tuple[torch.Tensor, tuple] | None:
        """`approx` (rows, vocab), in place, with the exact float32 logit of every token that may
        be the largest of its row, and where the largest are (rows, tokens); None where the full
        head is cheaper (too many tokens are close). `bound` is used up."""
        # A token can win only if its upper bound reaches the lower bound of the row's approximate
        # winner, which the largest exact logit is at least.
        top, at = approx.max(dim=1, keepdim=True)
        lowest_best = top - bound.gather(1, at)
        rows, tokens = (bound.add_(approx) >= lowest_best).nonzero(as_tuple=True)
        if tokens.numel() > MAX_CANDIDATES_RATIO * approx.numel():
            return None
        exact = (self.weight.detach()[tokens] * hidden[rows]).sum(dim=1)
        approx[rows, tokens] = exact
        best = torch.full_like(top[:, 0], -torch.inf).scatter_reduce_(0, rows, exact, "amax")
        wins = exact == best[rows]
        return approx, (rows[wins], tokens[wins])

    def check(self, samples: int = 4) -> bool:
        """Whether the kernel keeps to the bound here: random inputs, against the float head, and
        its sums against the same sums in float64 (a kernel just inside the bound is not trusted)."""
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(samples, self.weight.shape[1], generator=generator) * 3
        hidden[:, :4] *= 30  # a few outlier channels, as real hidden states have
        approx, bound = self.estimate(hidden)
        exact = F.linear(hidden, self.weight.detach())
        return bool(((approx - exact).abs() <= bound).all()) and self.estimates.computes_as_assumed(
            self.weight.detach(), hidden, approx, bound, exact)


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
        picked = screened.pick(flat, *screened.estimate(flat))
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
    head cannot be screened (or no kernel is there, or none keeps to its bound here)."""
    weight = head.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or head.bias is not None or torch.is_grad_enabled():
        return None
    screened = cache.get("head")
    if screened is not None and screened.current(weight):
        return screened
    cache.pop("head", None)
    if cache.get("broken"):
        return None
    screened = ScreenedHead.first_usable(weight)
    if screened is None:
        cache["broken"] = True
        return None
    cache["head"] = screened
    return screened
