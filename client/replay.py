"""Sending a run of past inference steps through open hops: rebuilding a session's cache on
new peers, and feeding a checker's mirror (client/session_check.py).

Consecutive steps that only append tokens are sent as one step of all their tokens (up to
MAX_MERGED_TOKENS): a peer computes 20 decode steps' tokens in one pass for about the price
of two or three single-token passes, and answers once. Each hop gets its merged steps back to
back, then its answers are read: one round trip's wait per hop, not one per step. A peer
computes a merged step with the same weights and cache, so its answers match the single
steps' within float rounding (what verification's tolerance allows for).
"""

from __future__ import annotations

from typing import Sequence

import torch

from swarm.wire import deserialize_tensor, serialize_tensor, swarm_pb2

from . import messages

MAX_MERGED_TOKENS = 128


def _joins(run: list[swarm_pb2.InferenceStep], step: swarm_pb2.InferenceStep, tokens: int) -> bool:
    """Whether `step` can be appended to `run` (holding `tokens` new tokens) as one step."""
    last = run[-1]
    new = step.hidden_states.shape[1]
    return (not step.HasField("hypo_ids")  # a reorder applies before its step's tokens: it may only open a run
            and step.HasField("attention_mask") == last.HasField("attention_mask")
            and step.HasField("position_ids") == last.HasField("position_ids")
            and step.position == last.position + last.hidden_states.shape[1]
            and tuple(step.hidden_states.shape[:1]) == tuple(last.hidden_states.shape[:1])
            and tokens + new <= MAX_MERGED_TOKENS)


def _runs(steps: Sequence[swarm_pb2.InferenceStep]) -> list[list[swarm_pb2.InferenceStep]]:
    runs, tokens = [], 0
    for step in steps:
        if runs and _joins(runs[-1], step, tokens):
            runs[-1].append(step)
            tokens += step.hidden_states.shape[1]
        else:
            runs.append([step])
            tokens = step.hidden_states.shape[1]
    return runs


def _merged(run: list[swarm_pb2.InferenceStep]) -> swarm_pb2.InferenceStep:
    """One step with every token of `run` (numbered as its last step: ids must increase)."""
    if len(run) == 1:
        return run[0]
    merged = swarm_pb2.InferenceStep()
    merged.CopyFrom(run[0])
    merged.step_id = run[-1].step_id
    for field in ("hidden_states", "attention_mask", "position_ids"):
        if run[0].HasField(field):
            joined = torch.cat([deserialize_tensor(getattr(step, field)) for step in run], dim=1)
            getattr(merged, field).CopyFrom(serialize_tensor(joined))
    return merged


def _split(output: swarm_pb2.Tensor, run: list[swarm_pb2.InferenceStep]) -> list[swarm_pb2.Tensor]:
    if len(run) == 1:
        return [output]
    sizes = [step.hidden_states.shape[1] for step in run]
    return [serialize_tensor(part.contiguous()) for part in deserialize_tensor(output).split(sizes, dim=1)]


def replay(hops: Sequence, steps: Sequence[swarm_pb2.InferenceStep], record: bool = True) -> list[swarm_pb2.Tensor]:
    """`steps` (as the first of `hops` is to get them) through `hops` (open session hops, each
    with a `stream`, and a `history` that gets the steps, unmerged, if `record`); the last
    hop's output for each step."""
    outputs = [step.hidden_states for step in steps]
    for open_hop in hops:
        sent = [messages.step_as_sent(step, inputs) for step, inputs in zip(steps, outputs)]
        runs = _runs(sent)
        merged = [_merged(run) for run in runs]
        for step in merged:
            open_hop.stream.send(step)
        outputs = [part for run, step in zip(runs, merged)
                   for part in _split(open_hop.stream.answer(step.step_id).hidden_states, run)]
        if record:
            open_hop.history.extend(sent)
    return outputs
