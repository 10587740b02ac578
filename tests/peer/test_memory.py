"""peer.memory: the KV-cache budget in tokens never over-commits and says why it refuses."""

from __future__ import annotations

import pytest

from peer.memory import CacheBudget, CacheBudgetExceeded, bytes_per_token
from swarm.checkpoint import resolve_checkpoint


def test_reserve_and_release_account_batch_times_max_length():
    budget = CacheBudget(8192)
    a = budget.reserve("a", batch_size=2, max_length=1024)
    b = budget.reserve("b", batch_size=1, max_length=4096)
    assert (a.tokens, b.tokens) == (2048, 4096)
    assert (budget.used_tokens, budget.free_tokens, budget.active_sessions) == (6144, 2048, 2)
    budget.release(a)
    assert (budget.free_tokens, budget.active_sessions) == (4096, 1)
    budget.release(a)  # twice: no double credit
    assert budget.free_tokens == 4096
    budget.release(b)
    assert (budget.free_tokens, budget.active_sessions) == (8192, 0)


def test_refusal_names_the_numbers():
    budget = CacheBudget(8192)
    budget.reserve("big", batch_size=1, max_length=7192)
    with pytest.raises(CacheBudgetExceeded) as refused:
        budget.reserve("s", batch_size=2, max_length=2048)
    assert str(refused.value).startswith(
        "session needs 4096 cache tokens (batch 2 x max_length 2048) but this peer has 1000 of 8192 free")
    assert (budget.free_tokens, budget.active_sessions) == (1000, 1)  # a refusal holds nothing


def test_exact_fit_is_accepted_and_freed_tokens_are_reusable():
    budget = CacheBudget(1000)
    first = budget.reserve("a", 1, 1000)
    assert budget.free_tokens == 0
    with pytest.raises(CacheBudgetExceeded):
        budget.reserve("b", 1, 1)
    budget.release(first)
    budget.reserve("b", 4, 250)
    assert budget.free_tokens == 0


def test_zero_budget_refuses_every_session_and_bad_sizes_are_errors():
    with pytest.raises(CacheBudgetExceeded, match="has 0 of 0 free"):
        CacheBudget(0).reserve("a", 1, 1)
    with pytest.raises(ValueError, match=">= 1"):
        CacheBudget(10).reserve("a", 0, 5)
    with pytest.raises(ValueError, match=">= 0"):
        CacheBudget(-1)


def test_bytes_per_token_for_the_default_model():
    config = resolve_checkpoint("smollm2-135m-instruct").config  # 3 KV heads of 64 dims
    assert bytes_per_token(config, num_blocks=10, itemsize=4) == 2 * 3 * 64 * 10 * 4
