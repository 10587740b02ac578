"""swarm.blocks on the default model split into [0,10), [10,20), [20,30): whatever goes through
the spans must match transformers' whole model (logits, greedy tokens, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swarm.blocks import BlockSpan, SpanInputError, SpanInputs, default_position_ids
from swarm.checkpoint import Checkpoint
from swarm.loading import load_span

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    # return the n-th Fibonacci number\n   "]


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def chained_backward(spans: list[BlockSpan], inputs: list[torch.Tensor], grad: torch.Tensor, span_kwargs: list[dict]):
    """Backward span by span in reverse, each peer given its own inputs and the grad of its outputs,
    as the client's remote autograd does. Returns the grad of the first span's inputs and every
    span's SpanGrads (in span order)."""
    all_grads = [None] * len(spans)
    for i in reversed(range(len(spans))):
        all_grads[i] = spans[i].backward(SpanInputs(inputs[i], **span_kwargs[i]), grad)
        grad = all_grads[i].hidden_states
    return grad, all_grads


def chained_forward(spans: list[BlockSpan], hidden: torch.Tensor, span_kwargs: list[dict]):
    """Forward without autograd, keeping each span's inputs (the client keeps them for backward)."""
    inputs = []
    with torch.no_grad():
        for span, kwargs in zip(spans, span_kwargs):
            inputs.append(hidden)
            hidden = span(SpanInputs(hidden, **kwargs))
    return hidden, inputs


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Cross-entropy of predicting each token from the position before it (the first token is
    predicted from the last prefix position)."""
    n = input_ids.shape[1]
    return F.cross_entropy(logits[:, prefix - 1: prefix - 1 + n].flatten(0, 1), input_ids.flatten())


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Absolute floor scaled to the gradient's size: elements near zero carry only rounding noise.
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


# --- forward and generation -------------------------------------------------------------------------


@pytest.mark.compat
def test_prefill_logits_match_transformers(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts,
                                           spans_forward):
    ids = token_ids(smollm2_tokenizer, PROMPTS[1])
    with torch.no_grad():
        expected = smollm2_model(ids).logits
        actual = smollm2_parts.logits(spans_forward(smollm2_spans, smollm2_parts.embed(ids)))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.compat
def test_greedy_from_span_caches_matches_generate(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts,
                                                  greedy_from_spans, greedy_from_model):
    ids = token_ids(smollm2_tokenizer, PROMPTS[0])
    expected = greedy_from_model(smollm2_model, ids, max_new_tokens=32)
    actual = greedy_from_spans(smollm2_parts, smollm2_spans, ids, max_new_tokens=32)
    assert actual.shape == (1, 32)
    assert actual.tolist() == expected.tolist(), smollm2_tokenizer.batch_decode(torch.cat([actual, expected]))


@pytest.mark.compat
def test_left_padded_batch_matches_batched_generate(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts,
                                                    greedy_from_spans, greedy_from_model):
    batch = smollm2_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (batch.attention_mask == 0).any(), "prompts must differ in length to exercise padding"
    expected = greedy_from_model(smollm2_model, batch.input_ids, batch.attention_mask, max_new_tokens=16)
    actual = greedy_from_spans(smollm2_parts, smollm2_spans, batch.input_ids, batch.attention_mask, max_new_tokens=16)
    assert actual.tolist() == expected.tolist(), smollm2_tokenizer.batch_decode(torch.cat([actual, expected]))


def test_positions_follow_the_padding_mask(smollm2_spans):
    """A left-padded row's text starts at position 0, as in generate; later steps continue it."""
    span = smollm2_spans[0]
    state = span.start_inference(batch_size=2, max_length=8)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    span.inference_step(state, torch.randn(2, 4, span.hidden_size), attention_mask=mask)
    assert state.attention_mask.tolist() == mask.tolist()
    assert default_position_ids(state.attention_mask, 0, 4, 2, torch.device("cpu")).tolist() == [
        [0, 0, 0, 1], [0, 1, 2, 3]]
    span.inference_step(state, torch.randn(2, 1, span.hidden_size), attention_mask=torch.ones(2, 1))
    assert default_position_ids(state.attention_mask, 4, 1, 2, torch.device("cpu")).tolist() == [[2], [4]]


def test_bfloat16_span_runs_and_stays_close(smollm2: Checkpoint, smollm2_tokenizer, smollm2_spans, smollm2_parts,
                                            spans_forward):
    bf16_spans = [load_span(smollm2, span.start, span.end, dtype=torch.bfloat16) for span in smollm2_spans]
    assert all(span.dtype == torch.bfloat16 for span in bf16_spans)
    ids = token_ids(smollm2_tokenizer, PROMPTS[0])
    with torch.no_grad():
        embeds = smollm2_parts.embed(ids)
        expected = smollm2_parts.logits(spans_forward(smollm2_spans, embeds))
        hidden = spans_forward(bf16_spans, embeds.to(torch.bfloat16))
        assert hidden.dtype == torch.bfloat16
        actual = smollm2_parts.logits(hidden.float())
    # bf16 keeps ~3 significant digits; through 30 blocks logits drift by a few tenths.
    assert (actual - expected).abs().mean() < 0.25
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    # An inference session runs in bf16 too.
    states = [span.start_inference(1, 16) for span in bf16_spans]
    hidden = embeds.to(torch.bfloat16)
    for span, state in zip(bf16_spans, states):
        hidden = span.inference_step(state, hidden)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()


# --- gradients, span by span -------------------------------------------------------------------------


def test_soft_prompt_grads_match_full_model_autograd(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts):
    ids = token_ids(smollm2_tokenizer, PROMPTS[0])  # 5 tokens + 4 prompt positions
    prefix, hidden_size = 4, smollm2_parts.embed_tokens.embedding_dim
    soft_prompt = torch.randn(prefix, hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05

    reference = soft_prompt.clone().requires_grad_(True)
    embeds = torch.cat([reference[None], smollm2_model.model.embed_tokens(ids)], dim=1)
    loss = lm_loss(smollm2_model(inputs_embeds=embeds).logits, ids, prefix)
    (expected,) = torch.autograd.grad(loss, reference)

    # The swarm: the client embeds and prepends, the spans only see hidden states.
    prompt = soft_prompt.clone().requires_grad_(True)
    hidden0 = torch.cat([prompt[None], smollm2_parts.embed(ids)], dim=1)
    no_kwargs = [{}] * len(smollm2_spans)
    out, inputs = chained_forward(smollm2_spans, hidden0.detach(), no_kwargs)
    out.requires_grad_(True)
    swarm_loss = lm_loss(smollm2_parts.logits(out), ids, prefix)
    torch.testing.assert_close(swarm_loss, loss, rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(swarm_loss, out)
    grad_hidden0, _ = chained_backward(smollm2_spans, inputs, grad_out, no_kwargs)
    hidden0.backward(grad_hidden0)

    assert expected.abs().max() > 0
    assert_grads_close(prompt.grad, expected)


def test_deep_prompt_grads_match_full_model_autograd(smollm2_model, smollm2_tokenizer, smollm2_spans, smollm2_parts):
    ids = token_ids(smollm2_tokenizer, PROMPTS[1])[:, :12]
    prefix, hidden_size, num_blocks = 3, smollm2_parts.embed_tokens.embedding_dim, 30
    deep_prompts = torch.randn(num_blocks, 1, prefix, hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05

    # Reference: transformers' model with each prompt added before its decoder layer.
    reference = deep_prompts.clone().requires_grad_(True)

    def adder(i: int):
        def pre_hook(module, args):
            hidden = args[0]
            head = hidden[:, :prefix] + reference[i]
            return (torch.cat([head, hidden[:, prefix:]], dim=1),) + tuple(args[1:])
        return pre_hook

    handles = [layer.register_forward_pre_hook(adder(i)) for i, layer in enumerate(smollm2_model.model.layers)]
    try:
        logits = smollm2_model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    loss = lm_loss(logits[:, 1:], ids[:, 1:], prefix=1)  # predict tokens 1.. from the token before them
    (expected,) = torch.autograd.grad(loss, reference)

    span_kwargs = [{"deep_prompts": deep_prompts[span.start: span.end]} for span in smollm2_spans]
    out, inputs = chained_forward(smollm2_spans, smollm2_parts.embed(ids), span_kwargs)
    out.requires_grad_(True)
    swarm_loss = lm_loss(smollm2_parts.logits(out)[:, 1:], ids[:, 1:], prefix=1)
    torch.testing.assert_close(swarm_loss, loss, rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(swarm_loss, out)
    _, span_grads = chained_backward(smollm2_spans, inputs, grad_out, span_kwargs)
    actual = torch.cat([g.deep_prompts for g in span_grads])

    assert actual.shape == deep_prompts.shape
    assert expected.abs().amax(dim=(1, 2, 3)).min() > 0, "every block's prompt must get a gradient"
    assert_grads_close(actual, expected)


def test_backward_gives_no_grad_to_the_blocks_weights(smollm2_spans):
    span = smollm2_spans[2]
    hidden = torch.randn(1, 4, span.hidden_size)
    grads = span.backward(SpanInputs(hidden), torch.randn_like(hidden))
    assert grads.hidden_states.shape == hidden.shape and grads.deep_prompts is None and grads.adapters == []
    assert all(p.grad is None and not p.requires_grad for p in span.parameters())


# --- sessions ---------------------------------------------------------------------------------------


def test_rollback_truncates_cache_and_refeeding_repeats_outputs(smollm2_parts, smollm2_tokenizer, smollm2_spans):
    span = smollm2_spans[1]
    hidden = torch.randn(1, 9, span.hidden_size, generator=torch.Generator().manual_seed(2))
    state = span.start_inference(1, 16)
    span.inference_step(state, hidden[:, :6])
    first = [span.inference_step(state, hidden[:, i: i + 1]) for i in range(6, 9)]
    assert state.position == 9

    # The client rewinds to 7 tokens (it is replaying or re-branching) and feeds token 7 again.
    again = span.inference_step(state, hidden[:, 7:8], position=7)
    assert state.position == 8
    assert state.cache.get_seq_length() == 8
    torch.testing.assert_close(again, first[1], rtol=0, atol=1e-6)
    # And a different continuation after a rewind matches a fresh session fed that continuation.
    other = torch.randn(1, 2, span.hidden_size, generator=torch.Generator().manual_seed(3))
    branched = span.inference_step(state, other, position=6)
    fresh = span.start_inference(1, 16)
    span.inference_step(fresh, hidden[:, :6])
    torch.testing.assert_close(branched, span.inference_step(fresh, other), rtol=0, atol=1e-5)

    with pytest.raises(SpanInputError, match="ahead of the 8 tokens"):
        span.inference_step(state, hidden[:, :1], position=12)


def test_inference_beyond_max_length_is_refused(smollm2_spans):
    span = smollm2_spans[0]
    state = span.start_inference(1, max_length=6)
    span.inference_step(state, torch.randn(1, 4, span.hidden_size))
    with pytest.raises(SpanInputError, match=r"position 4 with 3 tokens exceeds the session's max_length 6"):
        span.inference_step(state, torch.randn(1, 3, span.hidden_size))
    assert state.position == 4  # the refused step changed nothing
    span.inference_step(state, torch.randn(1, 2, span.hidden_size))
    assert state.position == 6


def test_refused_steps_leave_the_session_unchanged(smollm2_spans):
    span = smollm2_spans[0]
    hidden = torch.randn(2, 6, span.hidden_size, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    reference = span.start_inference(2, 8)
    span.inference_step(reference, hidden[:, :4], attention_mask=mask[:, :4])
    expected = span.inference_step(reference, hidden[:, 4:], attention_mask=mask[:, 4:])

    state = span.start_inference(2, 8)
    span.inference_step(state, hidden[:, :4], attention_mask=mask[:, :4])
    bad_steps = [
        dict(position_ids=torch.zeros(2, 3, dtype=torch.long)),  # wrong width
        dict(attention_mask=torch.ones(2, 5)),
        dict(hypo_ids=torch.tensor([0, 2])),
        dict(position=5),
    ]
    for bad in bad_steps:
        kwargs = dict(attention_mask=mask[:, 4:]) | bad
        with pytest.raises(SpanInputError):
            span.inference_step(state, hidden[:, 4:], **kwargs)
        assert state.position == 4 and state.attention_mask.shape == (2, 4) and state.cache.get_seq_length() == 4
    with pytest.raises(SpanInputError, match="max_length 8"):
        span.inference_step(state, torch.randn(2, 5, span.hidden_size), position=4)
    assert state.position == 4
    actual = span.inference_step(state, hidden[:, 4:], attention_mask=mask[:, 4:])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_hypo_ids_reorder_the_cache(smollm2_spans):
    """Beam search: after reordering, every row continues the hypothesis it was given."""
    span = smollm2_spans[2]
    hidden = torch.randn(2, 5, span.hidden_size, generator=torch.Generator().manual_seed(5))
    state = span.start_inference(2, 8)
    span.inference_step(state, hidden[:, :4])
    step = hidden[:, 4:]
    reordered = span.inference_step(state, step, hypo_ids=torch.tensor([1, 1]))
    alone = span.start_inference(1, 8)
    span.inference_step(alone, hidden[1:, :4])
    for row in range(2):
        expected = span.inference_step(alone, step[row:row + 1], position=4)[0]
        torch.testing.assert_close(reordered[row], expected, rtol=1e-4, atol=1e-3)
    fresh = span.start_inference(2, 8)
    span.inference_step(fresh, hidden[:, :4])
    not_reordered = span.inference_step(fresh, step)
    assert (not_reordered[0] - reordered[0]).abs().max() > 1e-2


def test_wrong_input_shapes_are_refused(smollm2_spans):
    span = smollm2_spans[0]
    with pytest.raises(SpanInputError, match=r"\(batch, seq, 576\), got \(1, 4, 512\)"):
        span(SpanInputs(torch.randn(1, 4, 512)))
    with pytest.raises(SpanInputError, match=r"\(batch, seq, 576\)"):
        span(SpanInputs(torch.randn(4, 576)))
    state = span.start_inference(2, 8)
    with pytest.raises(SpanInputError, match=r"\(batch, seq, 576\), got \(2, 1, 575\)"):
        span.inference_step(state, torch.randn(2, 1, 575))
    with pytest.raises(SpanInputError, match="opened for batch 2, step has batch 1"):
        span.inference_step(state, torch.randn(1, 1, 576))
    with pytest.raises(SpanInputError, match=r"attention_mask must have shape \(2, 3\)"):
        span.inference_step(state, torch.randn(2, 3, 576), attention_mask=torch.ones(2, 4))
    with pytest.raises(SpanInputError, match=r"deep_prompts must have shape \(10, 1 or 1, prefix, 576\)"):
        span(SpanInputs(torch.randn(1, 4, 576), deep_prompts=torch.zeros(30, 1, 2, 576)))
    hidden = torch.randn(1, 4, 576)
    with pytest.raises(SpanInputError, match="grad_outputs shape"):
        span.backward(SpanInputs(hidden), torch.randn(1, 3, 576))
    assert state.position == 0


def test_span_inputs_are_checked_once_per_span(smollm2_spans):
    span, other = smollm2_spans[0], smollm2_spans[1]
    mask = torch.tensor([[True, True, False]])
    checked = SpanInputs(torch.randn(1, 3, 576), mask).checked(span)
    assert checked.attention_mask.dtype == torch.long and checked.checked_for is span
    assert checked.checked(span) is checked, "checked inputs are not checked again for their span"
    assert checked.to(span.device, torch.float64).checked_for is span, "moving changes no shape"
    assert checked.checked(other) is not checked and checked.checked(other).checked_for is other
    with pytest.raises(SpanInputError, match=r"must be 0 \(padding\) or 1 \(token\)"):
        span(SpanInputs(torch.randn(1, 3, 576), torch.tensor([[1, 2, 1]])))
    with pytest.raises(SpanInputError, match=r"position_ids must have shape \(1 or 1, 3\)"):
        span(SpanInputs(torch.randn(1, 3, 576), position_ids=torch.zeros(1, 4, dtype=torch.long)))
    state = span.start_inference(1, 8)
    with pytest.raises(SpanInputError, match=r"must be 0 \(padding\) or 1 \(token\)"):
        span.inference_step(state, torch.randn(1, 2, 576), attention_mask=torch.tensor([[1, 3]]))
    assert state.position == 0
