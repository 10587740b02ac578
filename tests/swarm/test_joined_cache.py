"""Sessions stepping together keep one arrangement of their caches between passes
(swarm/joined_cache.py), and still get exactly what they get alone: while it grows past its
room, while members step alone, roll back, reorder beams, leave and come back; and sessions
whose padding would outweigh their keys are not arranged at all."""

from __future__ import annotations

import pytest
import torch

from swarm.blocks import BlockSpan
from swarm.joined_cache import SLACK
from swarm.step_batch import StepArgs
from tests.swarm.test_models import TINY_CONFIGS, TinyModel
from tests.swarm.test_step_batch import hidden

pytestmark = pytest.mark.compat  # the joined pass leans on the families' masks and cache layers


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def span(request, tmp_path_factory) -> BlockSpan:
    return TinyModel(request.param, tmp_path_factory.mktemp(request.param)).spans[-1]


def opened(span: BlockSpan, prompts: list[int], max_length: int) -> tuple[list, list]:
    """The same sessions twice, prompts run alone in both: one to step alone, one together."""
    pairs = []
    for i, prompt in enumerate(prompts):
        pair = [span.start_inference(2 if i == 2 else 1, max_length) for _ in range(2)]
        for state in pair:
            span.inference_step(state, hidden(state.batch_size, prompt, i, span.hidden_size))
        pairs.append(pair)
    return [a for a, _ in pairs], [b for _, b in pairs]


def shares(state, tensor: torch.Tensor) -> bool:
    return any(own.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
               for layer in state.cache.layers for own in (layer.keys, layer.values))


def test_an_arrangement_lasts_while_its_members_step_together_and_matches_steps_alone(span: BlockSpan):
    alone, together = opened(span, [5, 9, 7, 12], max_length=64)
    rounds, arrangements = SLACK + 8, []
    for r in range(rounds):  # past the room the arrangement starts with
        members = [0, 1, 3] if r == 10 else [0, 1, 2, 3]  # session 2 steps alone this round
        args = [dict(hidden_states=hidden(s.batch_size, 1, 100 * r + i, span.hidden_size)) for i, s in enumerate(alone)]
        if r == 20:
            args[1]["position"] = alone[1].position - 2  # a rollback: the client replays
        if r == 25:
            args[2]["hypo_ids"] = torch.tensor([1, 0])  # beams swap
        expected = [span.inference_step(state, **a) for state, a in zip(alone, args)]
        viewed = together[2].cache.layers[0].keys  # a view of the arrangement, from round 1 on
        run = span.inference_steps([StepArgs(together[i], **args[i]) for i in members])
        assert run.passes == [len(members)]
        for i, got in zip(members, run.results):
            assert not isinstance(got, Exception), got
            torch.testing.assert_close(got, expected[i], rtol=1e-4, atol=5e-5, msg=f"session {i}, round {r}")
        if r == 10:
            assert together[2].joined is None and not shares(together[2], viewed)  # it has its own copy
            got = span.inference_step(together[2], **args[2])
            torch.testing.assert_close(got, expected[2], rtol=1e-4, atol=5e-5)
        arrangements.append(together[0].joined)
        assert all(s.joined is arrangements[-1] for i, s in enumerate(together) if i in members)
        assert [s.position for s in together] == [s.position for s in alone]
    # Laid out anew only when the members changed: rounds 10 and 11 (session 2 left and came
    # back), 20 (a rollback), 25 (reordered beams).
    new = [r for r in range(1, rounds) if arrangements[r] is not arrangements[r - 1]]
    assert new == [10, 11, 20, 25]
    assert arrangements[-1].keys[0].shape[2] > 12 + 1 + SLACK  # it grew


def test_a_member_that_leaves_keeps_its_cache_when_the_others_go_on(span: BlockSpan):
    alone, together = opened(span, [6, 8, 7], max_length=32)
    for r in range(3):
        members = [0, 1, 2] if r == 0 else [0, 1]
        args = [dict(hidden_states=hidden(s.batch_size, 1, 10 * r + i, span.hidden_size)) for i, s in enumerate(alone)]
        expected = [span.inference_step(alone[i], **args[i]) for i in members]
        run = span.inference_steps([StepArgs(together[i], **args[i]) for i in members])
        for got, want in zip(run.results, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    assert not shares(together[2], together[0].joined.keys[0])
    del together[0], together[0]  # the two sessions close: only the one that left still holds its cache
    args = dict(hidden_states=hidden(2, 1, 99, span.hidden_size))
    torch.testing.assert_close(span.inference_step(together[0], **args), span.inference_step(alone[2], **args),
                               rtol=1e-4, atol=5e-5)


def test_sessions_whose_padding_outweighs_their_keys_are_not_arranged(span: BlockSpan):
    alone, together = opened(span, [30, 2, 2], max_length=40)  # 84 padded rows of keys against 36
    for r in range(2):
        args = [dict(hidden_states=hidden(s.batch_size, 1, 10 * r + i, span.hidden_size)) for i, s in enumerate(alone)]
        expected = [span.inference_step(state, **a) for state, a in zip(alone, args)]
        run = span.inference_steps([StepArgs(state, **a) for state, a in zip(together, args)])
        assert run.passes == [3]
        for got, want in zip(run.results, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
        assert all(state.joined is None for state in together)


def test_a_member_stepping_alone_dissolves_the_arrangement(span: BlockSpan):
    alone, together = opened(span, [6, 8, 7], max_length=32)
    for r in range(4):
        args = [dict(hidden_states=hidden(s.batch_size, 1, 10 * r + i, span.hidden_size)) for i, s in enumerate(alone)]
        expected = [span.inference_step(state, **a) for state, a in zip(alone, args)]
        if r == 2:  # one client's step comes alone: nobody keeps the arrangement's tensors
            viewed = [s.cache.layers[-1].values for s in together]
            got = [span.inference_step(together[0], **args[0])]
            assert all(s.joined is None and not any(shares(s, v) for v in viewed) for s in together)
            got += span.inference_steps([StepArgs(s, **a) for s, a in zip(together[1:], args[1:])]).results
        else:
            got = span.inference_steps([StepArgs(s, **a) for s, a in zip(together, args)]).results
        for i, (g, want) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=5e-5, msg=f"session {i}, round {r}")
    assert together[0].joined is not None and together[0].joined is together[2].joined
