"""peer.lying: the test-only liar lies exactly when its SPEC says, and by enough to matter."""

from __future__ import annotations

import pytest
import torch

from peer.lying import Liar, check_lie_spec


def lies(liar: Liar, calls: int) -> list[bool]:
    x = torch.randn(1, 2, 8)
    return [liar.distort(x) is not x for _ in range(calls)]


def test_always_and_after_n():
    assert lies(Liar("always"), 3) == [True] * 3
    assert lies(Liar("after:2"), 4) == [False, False, True, True]


def test_a_rate_lies_that_often_and_repeats_with_its_seed():
    first = lies(Liar("0.1", seed=3), 2000)
    assert 150 < sum(first) < 250
    assert lies(Liar("0.1", seed=3), 2000) == first


def test_a_lie_moves_every_token_by_about_scale_times_its_norm():
    x = torch.randn(1, 4, 256) * torch.tensor([1.0, 10.0, 100.0, 1000.0])[None, :, None]
    lied = Liar("always", scale=0.5).distort(x)
    relative = (lied - x).norm(dim=-1) / x.norm(dim=-1)
    assert ((relative > 0.4) & (relative < 0.6)).all()


@pytest.mark.parametrize("spec", ["sometimes", "1.5", "after:", "-0.1"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="expected 'always'"):
        check_lie_spec(spec)
