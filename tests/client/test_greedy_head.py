"""The screened LM head (client/greedy_head.py): its argmax is the float head's, its bound
holds, and it steps aside wherever it cannot promise that."""

from __future__ import annotations

import pytest
import torch

from client import head_estimates
from client.greedy_head import GreedySteps, ScreenedHead
from client.head_estimates import ESTIMATES, BFloat16Activations, Int8Activations


def head(vocab: int = 4096, hidden: int = 128, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(hidden, vocab, bias=False)
    linear.weight.data.normal_(0, 0.05)
    return linear


def screened_logits(linear: torch.nn.Linear, states: torch.Tensor, cache: dict) -> torch.Tensor | None:
    """One greedy step's logits, (rows, vocab), as the model's forward gets them."""
    logits = GreedySteps(cache).logits(linear, states[:, None])
    return logits[:, 0] if logits is not None else None


def hidden_states(rows: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, width, generator=generator)
    states[:, 3] *= 40  # an outlier channel, as real final hidden states have
    return states


@pytest.mark.parametrize("estimate", ESTIMATES)
@torch.no_grad()
def test_the_bound_holds_and_the_argmax_is_the_float_heads(estimate):
    linear = head()
    screened = ScreenedHead(linear.weight, estimate)
    states = hidden_states(64, 128)
    exact = linear(states)
    approx, bound = screened.estimate(states)
    assert ((approx - exact).abs() <= bound).all()
    # Not a bound that lets everything through: a handful of candidates a row.
    assert ((approx + bound >= (approx - bound).amax(dim=1, keepdim=True)).sum(dim=1) < 64).all()
    logits, _ = screened.pick(states, approx.clone(), bound)
    assert torch.equal(logits.argmax(dim=1), exact.argmax(dim=1))
    winners = exact.argmax(dim=1, keepdim=True)
    torch.testing.assert_close(logits.gather(1, winners), exact.gather(1, winners))


@torch.no_grad()
def test_near_ties_go_to_the_float_heads_winner():
    """Rows that differ by less than int8 can tell apart: the float head decides."""
    linear = head()
    weight = linear.weight.data
    states = hidden_states(32, 128, seed=2)
    for row, state in enumerate(states):
        best = int(linear(state).argmax())
        rival = (best + 1 + row) % weight.shape[0]
        # The rival's row: the winner's, nudged along the state by an amount int8 cannot see.
        weight[rival] = weight[best] + (1e-4 if row % 2 else -1e-4) * state / state.norm()
        exact = linear(state[None])
        logits = screened_logits(linear, state[None], {})
        assert logits is not None
        assert int(logits.argmax()) == int(exact.argmax()), row


@torch.no_grad()
def test_it_steps_aside_where_it_cannot_promise_the_argmax():
    linear = head()
    states = hidden_states(2, 128)
    assert screened_logits(linear, states, {}) is not None
    assert screened_logits(linear, states.double(), {}) is None
    assert screened_logits(head(), torch.full((1, 128), float("nan")), {}) is None
    flat = torch.zeros(1, 128)  # every token ties: the full head is cheaper
    assert screened_logits(linear, flat, {}) is None
    with torch.enable_grad():
        assert screened_logits(linear, states, {}) is None


@torch.no_grad()
def test_a_head_that_changes_is_copied_again():
    linear = head()
    cache: dict = {}
    states = hidden_states(4, 128)
    screened_logits(linear, states, cache)
    first = cache["head"]
    linear.weight[:100] *= -1  # in place, as an optimizer step or load_state_dict writes
    logits = screened_logits(linear, states, cache)
    assert cache["head"] is not first
    assert torch.equal(logits.argmax(dim=1), linear(states).argmax(dim=1))


@torch.no_grad()
def test_the_fastest_kernel_here_is_used_and_a_kernel_that_breaks_its_bound_is_not(monkeypatch):
    linear, states = head(), hidden_states(2, 128)
    cache: dict = {}
    screened_logits(linear, states, cache)
    assert type(cache["head"].estimates) is Int8Activations  # fbgemm is in torch's x86 wheels, as CI's
    monkeypatch.setattr(head_estimates, "CODE_ROUNDING", 0.0)  # as if the kernel lost precision
    cache = {}
    assert torch.equal(screened_logits(linear, states, cache).argmax(dim=1), linear(states).argmax(dim=1))
    assert type(cache["head"].estimates) is BFloat16Activations
    monkeypatch.setattr(head_estimates, "BF16_WEIGHT_BOUND", 0.0)
    cache = {}
    assert screened_logits(linear, states, cache) is None
    assert cache.get("broken")


@torch.no_grad()
def test_bfloat16_input_steps_aside_for_hidden_sizes_its_kernel_breaks_on():
    with pytest.raises(NotImplementedError):
        BFloat16Activations(head(hidden=100).weight)
    linear, states = head(hidden=100), hidden_states(3, 100)
    logits = screened_logits(linear, states, {})  # fbgemm reads any size
    assert torch.equal(logits.argmax(dim=1), linear(states).argmax(dim=1))


@pytest.mark.parametrize("rows", [1, 8])
@torch.no_grad()
def test_batches_screen_row_by_row(rows):
    linear = head(vocab=1000, hidden=64)
    states = hidden_states(rows, 64, seed=5)
    logits = screened_logits(linear, states, {})
    assert logits.shape == (rows, 1000)
    assert torch.equal(logits.argmax(dim=-1), linear(states).argmax(dim=-1))
    if rows > 1:
        assert GreedySteps({}).logits(linear, states.reshape(1, rows, 64)) is None  # several positions a row


@torch.no_grad()
def test_a_masked_winner_makes_the_tokens_left_be_picked_again():
    """`min_new_tokens` masks EOS, say, when EOS was the winner: the runner-up, which the int8
    copy alone may have misjudged, must be the float head's."""
    linear = head()
    states = hidden_states(16, 128, seed=7)
    steps = GreedySteps({})
    for state in states:
        exact = linear(state[None])
        logits = steps.logits(linear, state[None, None])[:, 0]
        candidates = logits == (linear.weight * state).sum(dim=1)  # those computed exactly: all that could win
        masked = logits.masked_fill(candidates, -torch.inf)  # as a masking processor would
        mended = steps.mend(masked)
        best = int(exact.masked_fill(candidates, -torch.inf).argmax())
        assert int(mended.argmax()) == best
        assert torch.isneginf(mended[candidates]).all()
        torch.testing.assert_close(mended[0, best], exact[0, best], rtol=1e-6, atol=1e-6)
        loser = steps.logits(linear, state[None, None])[:, 0].clone()
        loser[0, int(loser.argsort(descending=True)[0, 1])] = -torch.inf  # the runner-up only: the winner stays
        assert steps.mend(loser) is loser
    assert steps.mend(masked) is masked  # once per step: a stale step is not mended


@pytest.mark.parametrize("eos", [2, [2, 7], [5, 10**6]])
def test_eos_held_back_in_place_as_transformers_min_length_processors(eos):
    """The in-place twins give the scores transformers' own give, at every length (below the
    minimum, at it, past it), for one EOS id, several, and one outside the vocabulary."""
    from transformers.generation import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    from client.greedy_head import EosHeldBack

    theirs = [MinLengthLogitsProcessor(6, eos), MinNewTokensLengthLogitsProcessor(3, 2, eos)]
    ours = [EosHeldBack.replacing(processor) for processor in theirs]
    assert all(type(processor) is EosHeldBack for processor in ours)
    scores = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    for length in range(3, 9):
        input_ids = torch.ones(2, length, dtype=torch.long)
        for their, our in zip(theirs, ours):
            expected = their(input_ids, scores)
            got = our(input_ids, scores.clone())
            assert torch.equal(got, expected), (type(their).__name__, length)
